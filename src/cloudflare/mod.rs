//! Everything that speaks to Cloudflare's API: the request budget, the HTTP
//! client and the response shapes.

pub mod budget;
pub mod client;
pub mod types;

pub use budget::{RateLimit, RequestBudget};
pub use client::{ApiError, Client, ClientError, ClientOptions, Endpoint, FailureReason, Outcome};
pub use types::{ApiMessage, Envelope, PageTally, PolicyTestStatus, TestState};

//! The one error the gateway and the tiers return, and its two mappings, each written
//! once: to a gRPC status (`From<ServeError> for Status`) and to an HTTP status with an
//! OpenAI error body (`openai.rs`, `IntoResponse for ServeError`). A remote tier's
//! status comes back into the same enum (`From<Status>`), so a client of the gateway
//! sees the same kind of error whether the tier ran in process or across the network.

use iris_engine::ErrorKind;
use tonic::{Code, Status};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServeError {
    /// The request is at fault: INVALID_ARGUMENT / 400.
    #[error("{0}")]
    BadInput(String),
    /// An unknown model: NOT_FOUND / 404.
    #[error("{0}")]
    NotFound(String),
    /// Full right now (queues, memory): RESOURCE_EXHAUSTED / 429 with Retry-After.
    #[error("{0}")]
    Overloaded(String),
    /// The tier cannot serve (down, stopped, draining): UNAVAILABLE / 503.
    #[error("{0}")]
    Unavailable(String),
    /// The deadline passed: DEADLINE_EXCEEDED / 504.
    #[error("{0}")]
    Deadline(String),
    /// The server failed: INTERNAL / 500.
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = ServeError> = std::result::Result<T, E>;

impl ServeError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ServeError {
        let m = message.into();
        match kind {
            ErrorKind::BadInput => ServeError::BadInput(m),
            ErrorKind::NotFound => ServeError::NotFound(m),
            ErrorKind::Overloaded => ServeError::Overloaded(m),
            ErrorKind::Unavailable => ServeError::Unavailable(m),
            ErrorKind::Deadline => ServeError::Deadline(m),
            ErrorKind::Internal => ServeError::Internal(m),
        }
    }

    pub fn bad_input(m: impl Into<String>) -> ServeError {
        ServeError::BadInput(m.into())
    }

    pub fn internal(m: impl Into<String>) -> ServeError {
        ServeError::Internal(m.into())
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            ServeError::BadInput(_) => ErrorKind::BadInput,
            ServeError::NotFound(_) => ErrorKind::NotFound,
            ServeError::Overloaded(_) => ErrorKind::Overloaded,
            ServeError::Unavailable(_) => ErrorKind::Unavailable,
            ServeError::Deadline(_) => ErrorKind::Deadline,
            ServeError::Internal(_) => ErrorKind::Internal,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            ServeError::BadInput(m)
            | ServeError::NotFound(m)
            | ServeError::Overloaded(m)
            | ServeError::Unavailable(m)
            | ServeError::Deadline(m)
            | ServeError::Internal(m) => m,
        }
    }

    /// The label requests are counted under in `/metrics` and logged with.
    pub fn label(&self) -> &'static str {
        match self {
            ServeError::BadInput(_) => "invalid_argument",
            ServeError::NotFound(_) => "not_found",
            ServeError::Overloaded(_) => "resource_exhausted",
            ServeError::Unavailable(_) => "unavailable",
            ServeError::Deadline(_) => "deadline_exceeded",
            ServeError::Internal(_) => "internal",
        }
    }
}

/// Engine, model and image errors: their kind decides.
impl From<iris_engine::Error> for ServeError {
    fn from(e: iris_engine::Error) -> ServeError {
        ServeError::new(e.kind(), e.to_string())
    }
}

/// A tensor operation failed outside the models (the wire's conversions): shapes are
/// checked before, so this is the server's fault.
impl From<iris_tensor::Error> for ServeError {
    fn from(e: iris_tensor::Error) -> ServeError {
        ServeError::internal(e.to_string())
    }
}

/// The gRPC mapping.
impl From<ServeError> for Status {
    fn from(e: ServeError) -> Status {
        let code = match e {
            ServeError::BadInput(_) => Code::InvalidArgument,
            ServeError::NotFound(_) => Code::NotFound,
            ServeError::Overloaded(_) => Code::ResourceExhausted,
            ServeError::Unavailable(_) => Code::Unavailable,
            ServeError::Deadline(_) => Code::DeadlineExceeded,
            ServeError::Internal(_) => Code::Internal,
        };
        Status::new(code, e.message())
    }
}

/// A status from another member (or tonic itself) back into the enum. A broken
/// connection (UNKNOWN, CANCELLED from the far end) is the member being unavailable.
impl From<Status> for ServeError {
    fn from(s: Status) -> ServeError {
        let m = s.message().to_string();
        match s.code() {
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
                ServeError::BadInput(m)
            }
            Code::NotFound => ServeError::NotFound(m),
            Code::ResourceExhausted => ServeError::Overloaded(m),
            Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Aborted => {
                ServeError::Unavailable(m)
            }
            Code::DeadlineExceeded => ServeError::Deadline(m),
            _ => ServeError::Internal(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_through_grpc() {
        for e in [
            ServeError::BadInput("a".into()),
            ServeError::NotFound("b".into()),
            ServeError::Overloaded("c".into()),
            ServeError::Unavailable("d".into()),
            ServeError::Deadline("e".into()),
            ServeError::Internal("f".into()),
        ] {
            let back = ServeError::from(Status::from(e.clone()));
            assert_eq!(back, e);
            assert_eq!(ServeError::new(e.kind(), e.message()), e);
        }
        let busy = iris_engine::Error::Busy("full".into());
        assert_eq!(
            ServeError::from(busy),
            ServeError::Overloaded("full".into())
        );
    }
}

//! The `vhost-user-console` backend (in progress: the control protocol is done, the device
//! and its port kinds are not yet wired in).

pub mod control;
pub mod port;

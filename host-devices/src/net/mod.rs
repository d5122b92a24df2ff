//! The `vhost-user-net` backend (in progress): frame handling and the switch's forwarding
//! table exist; the device and the program do not yet.

pub mod frame;
pub mod switch;

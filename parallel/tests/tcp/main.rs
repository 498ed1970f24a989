//! The TCP communicator's integration tests, in one binary (each test binary links all of
//! burn): properties of every collective over real loopback sockets, and faults.

mod common;

mod contract;

mod faults;
mod props;

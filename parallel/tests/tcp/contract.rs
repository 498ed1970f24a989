//! The communicator contract ([`parallel::contract`]) on TCP groups of 1 to 4 ranks, with
//! the CPU backend's tensors (the host path of every tensor collective).

use crate::common::*;
use std::time::Duration;

use burn::backend::Flex;
use parallel::contract;
use tidemill_parallel as parallel;

#[test]
fn tcp_groups_keep_the_communicator_contract() {
    for n in 1..=4 {
        let comms = group(n, Duration::from_secs(30));
        let outcomes = on_all(&comms, |_, c| {
            contract::check::<Flex>(c, &Default::default())
        });
        for outcome in outcomes {
            let cases = outcome.unwrap_or_else(|e| panic!("world {n}: {e}"));
            assert_eq!(cases, 34 + n, "world {n}: cases run");
        }
    }
}

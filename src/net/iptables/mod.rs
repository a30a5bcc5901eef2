//! Port mapping with iptables: a pure rule model (per-task chains under
//! five shared chains) and its atomic batch apply and removal.

pub mod apply;
pub mod rules;

pub use apply::{
    route_localnet_enabled, route_localnet_fix, Iptables, IptablesError, RestoreFailure, Rollback,
    HOST_LOCK_PATH,
};
pub use rules::{
    base_chains, port_forward_rules, restore_batch, task_chain, task_port_rules, task_tag, BatchOp,
    ForwardTarget, IptablesRule, PortForward, RuleError, CHAIN_FW, CHAIN_IN, CHAIN_OUT, CHAIN_PRT,
    CHAIN_PST, TAG_PREFIX, TASK_CHAINS,
};

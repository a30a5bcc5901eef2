//! nomad-driver-virt: a Nomad task-driver plugin that runs virtual machines
//! through libvirt, speaking go-plugin gRPC to the Nomad client.

#![deny(unsafe_code)]

pub mod pb;

pub mod cli;
pub mod cloudinit;
pub mod config;
pub mod driver;
pub mod faults;
pub mod fsopen;
pub mod guest_agent;
pub mod hypervisor;
pub mod libvirt;
pub mod logging;
pub mod meta;
pub mod net;
pub mod nomad;
pub mod nomad_client;
pub mod plugin;
pub mod storage;
pub mod task;

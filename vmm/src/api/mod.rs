//! The control API's server side: [`server`] answers the requests described in
//! [`podvisor_vmm_api`] (paths, bodies, codec) by calling the VM's handle.

pub mod server;

//! The runtime, pod and container commands: `version`, `info`, `runp`, `stopp`, `rmp`,
//! `pods`, `inspectp`, `create`, `start`, `stop`, `rm`, `ps`, `inspect`.

use std::collections::HashMap;
use std::path::Path;

use k8s_cri::v1 as cri;

use crate::client::{Cri, rpc_error};
use crate::configs::{pod_name, read_container_config, read_pod_config};
use crate::output::{
    ago, container_state, format_table, handler_or_default, pod_state, print_json, readable_json,
    row, short_id, short_image,
};

impl Cri {
    pub(crate) async fn version(&mut self) -> anyhow::Result<()> {
        let v = self
            .runtime
            .version(cri::VersionRequest {
                version: "v1".into(),
            })
            .await
            .map_err(rpc_error("version"))?
            .into_inner();
        println!("Version:  {}", v.version);
        println!("RuntimeName:  {}", v.runtime_name);
        println!("RuntimeVersion:  {}", v.runtime_version);
        println!("RuntimeApiVersion:  {}", v.runtime_api_version);
        Ok(())
    }

    pub(crate) async fn info(&mut self) -> anyhow::Result<()> {
        let status = self
            .runtime
            .status(cri::StatusRequest { verbose: true })
            .await
            .map_err(rpc_error("status"))?
            .into_inner();
        print_json(readable_json(&status)?)
    }

    pub(crate) async fn run_pod(
        &mut self,
        config: &Path,
        runtime_handler: String,
    ) -> anyhow::Result<()> {
        let config = read_pod_config(config)?;
        let name = pod_name(&config);
        let id = self
            .runtime
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config),
                runtime_handler,
            })
            .await
            .map_err(rpc_error(format_args!("run pod {name:?}")))?
            .into_inner()
            .pod_sandbox_id;
        println!("{id}");
        Ok(())
    }

    pub(crate) async fn stop_pod(&mut self, id: &str) -> anyhow::Result<()> {
        let id = self.pod_id(id).await?;
        self.runtime
            .stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: id.clone(),
            })
            .await
            .map_err(rpc_error(format_args!("stop pod {id}")))?;
        println!("Stopped sandbox {id}");
        Ok(())
    }

    pub(crate) async fn remove_pod(&mut self, id: &str) -> anyhow::Result<()> {
        let id = self.pod_id(id).await?;
        self.runtime
            .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: id.clone(),
            })
            .await
            .map_err(rpc_error(format_args!("remove pod {id}")))?;
        println!("Removed sandbox {id}");
        Ok(())
    }

    pub(crate) async fn pods(&mut self, quiet: bool) -> anyhow::Result<()> {
        let mut pods = self.list_pods().await?;
        pods.sort_by_key(|p| std::cmp::Reverse(p.created_at));
        if quiet {
            for p in &pods {
                println!("{}", p.id);
            }
            return Ok(());
        }
        let now = podvisor_common::now_ns();
        let mut rows = vec![row([
            "POD ID",
            "CREATED",
            "STATE",
            "NAME",
            "NAMESPACE",
            "ATTEMPT",
            "RUNTIME",
        ])];
        for p in &pods {
            let meta = p.metadata.clone().unwrap_or_default();
            rows.push(vec![
                short_id(&p.id),
                ago(now, p.created_at),
                pod_state(p.state).to_string(),
                meta.name,
                meta.namespace,
                meta.attempt.to_string(),
                handler_or_default(&p.runtime_handler),
            ]);
        }
        print!("{}", format_table(&rows));
        Ok(())
    }

    pub(crate) async fn inspect_pod(&mut self, id: &str) -> anyhow::Result<()> {
        let id = self.pod_id(id).await?;
        let status = self
            .runtime
            .pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: id.clone(),
                verbose: true,
            })
            .await
            .map_err(rpc_error(format_args!("pod status {id}")))?
            .into_inner();
        print_json(readable_json(&status)?)
    }

    pub(crate) async fn create(
        &mut self,
        pod_id: &str,
        container_config: &Path,
        pod_config: &Path,
    ) -> anyhow::Result<()> {
        let pod_id = self.pod_id(pod_id).await?;
        let config = read_container_config(container_config)?;
        let sandbox_config = read_pod_config(pod_config)?;
        let name = config
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let id = self
            .runtime
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod_id.clone(),
                config: Some(config),
                sandbox_config: Some(sandbox_config),
            })
            .await
            .map_err(rpc_error(format_args!(
                "create container {name:?} in pod {pod_id}"
            )))?
            .into_inner()
            .container_id;
        println!("{id}");
        Ok(())
    }

    pub(crate) async fn start(&mut self, id: &str) -> anyhow::Result<()> {
        let id = self.container_id(id).await?;
        self.runtime
            .start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .map_err(rpc_error(format_args!("start container {id}")))?;
        println!("{id}");
        Ok(())
    }

    pub(crate) async fn stop(&mut self, id: &str, timeout: i64) -> anyhow::Result<()> {
        let id = self.container_id(id).await?;
        self.runtime
            .stop_container(cri::StopContainerRequest {
                container_id: id.clone(),
                timeout,
            })
            .await
            .map_err(rpc_error(format_args!("stop container {id}")))?;
        println!("{id}");
        Ok(())
    }

    pub(crate) async fn remove(&mut self, id: &str) -> anyhow::Result<()> {
        let id = self.container_id(id).await?;
        self.runtime
            .remove_container(cri::RemoveContainerRequest {
                container_id: id.clone(),
            })
            .await
            .map_err(rpc_error(format_args!("remove container {id}")))?;
        println!("{id}");
        Ok(())
    }

    pub(crate) async fn ps(&mut self, all: bool, quiet: bool) -> anyhow::Result<()> {
        let mut containers = self.list_containers().await?;
        if !all {
            containers.retain(|c| c.state == cri::ContainerState::ContainerRunning as i32);
        }
        containers.sort_by_key(|c| std::cmp::Reverse(c.created_at));
        if quiet {
            for c in &containers {
                println!("{}", c.id);
            }
            return Ok(());
        }
        let pod_names: HashMap<String, String> = self
            .list_pods()
            .await?
            .into_iter()
            .map(|p| (p.id, p.metadata.map(|m| m.name).unwrap_or_default()))
            .collect();
        let now = podvisor_common::now_ns();
        let mut rows = vec![row([
            "CONTAINER",
            "IMAGE",
            "CREATED",
            "STATE",
            "NAME",
            "ATTEMPT",
            "POD ID",
            "POD",
        ])];
        for c in &containers {
            let meta = c.metadata.clone().unwrap_or_default();
            let image = c
                .image
                .as_ref()
                .map(|i| i.image.as_str())
                .filter(|i| !i.is_empty())
                .unwrap_or(&c.image_ref);
            rows.push(vec![
                short_id(&c.id),
                short_image(image),
                ago(now, c.created_at),
                container_state(c.state).to_string(),
                meta.name,
                meta.attempt.to_string(),
                short_id(&c.pod_sandbox_id),
                pod_names
                    .get(&c.pod_sandbox_id)
                    .cloned()
                    .unwrap_or_default(),
            ]);
        }
        print!("{}", format_table(&rows));
        Ok(())
    }

    pub(crate) async fn inspect(&mut self, id: &str) -> anyhow::Result<()> {
        let id = self.container_id(id).await?;
        let status = self.container_status(&id).await?;
        print_json(readable_json(&status)?)
    }
}

//! The connection to podvisord ([`Cri`]: both CRI services on one Unix socket), gRPC
//! failures as errors, and pod and container IDs given as unique prefixes.

use std::path::Path;

use anyhow::bail;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint};

/// A failed call as an error: what was asked, the gRPC code and the server's message.
pub(crate) fn rpc_error(
    what: impl std::fmt::Display,
) -> impl FnOnce(tonic::Status) -> anyhow::Error {
    move |status| match status.message() {
        "" => anyhow::anyhow!("{what}: {:?}", status.code()),
        message => anyhow::anyhow!("{what}: {:?}: {message}", status.code()),
    }
}

/// The two CRI services on one connection.
pub(crate) struct Cri {
    pub(crate) runtime: RuntimeServiceClient<Channel>,
    pub(crate) images: ImageServiceClient<Channel>,
}

impl Cri {
    pub(crate) async fn connect(socket: &Path) -> anyhow::Result<Self> {
        let path = socket.to_path_buf();
        // The URI is required by the API but unused: every connection goes to the socket.
        let channel = Endpoint::try_from("http://[::]:50051")?
            .connect_with_connector(tower::service_fn(move |_| {
                let p = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(p).await?,
                    ))
                }
            }))
            .await?;
        Ok(Cri {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        })
    }

    pub(crate) async fn list_pods(&mut self) -> anyhow::Result<Vec<cri::PodSandbox>> {
        Ok(self
            .runtime
            .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
            .await
            .map_err(rpc_error("list pods"))?
            .into_inner()
            .items)
    }

    pub(crate) async fn list_containers(&mut self) -> anyhow::Result<Vec<cri::Container>> {
        Ok(self
            .runtime
            .list_containers(cri::ListContainersRequest { filter: None })
            .await
            .map_err(rpc_error("list containers"))?
            .into_inner()
            .containers)
    }

    pub(crate) async fn container_status(
        &mut self,
        id: &str,
    ) -> anyhow::Result<cri::ContainerStatusResponse> {
        Ok(self
            .runtime
            .container_status(cri::ContainerStatusRequest {
                container_id: id.to_string(),
                verbose: true,
            })
            .await
            .map_err(rpc_error(format_args!("container status {id}")))?
            .into_inner())
    }

    /// The full ID of the pod `given` is a unique prefix of.
    pub(crate) async fn pod_id(&mut self, given: &str) -> anyhow::Result<String> {
        let pods = self.list_pods().await?;
        resolve_id("pod", given, pods.iter().map(|p| p.id.as_str()))
    }

    /// The full ID of the container `given` is a unique prefix of.
    pub(crate) async fn container_id(&mut self, given: &str) -> anyhow::Result<String> {
        let containers = self.list_containers().await?;
        resolve_id("container", given, containers.iter().map(|c| c.id.as_str()))
    }
}

/// The ID among `ids` that is `given` or, failing that, the only one starting with it.
fn resolve_id<'a>(
    what: &str,
    given: &str,
    ids: impl IntoIterator<Item = &'a str>,
) -> anyhow::Result<String> {
    if given.is_empty() {
        bail!("empty {what} ID");
    }
    let mut matches = Vec::new();
    for id in ids {
        if id == given {
            return Ok(id.to_string());
        }
        if id.starts_with(given) {
            matches.push(id);
        }
    }
    match matches.as_slice() {
        [] => bail!("no {what} with ID {given:?}"),
        [only] => Ok(only.to_string()),
        many => bail!(
            "{what} ID {given:?} is ambiguous: it matches {}",
            many.join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_prefixes() {
        let ids = ["abc123", "abd456", "ff00", "ff"];
        let resolve = |given: &str| resolve_id("pod", given, ids);
        assert_eq!(resolve("abc").expect("unique"), "abc123");
        assert_eq!(resolve("abd456").expect("whole"), "abd456");
        // A whole ID wins over being a prefix of another.
        assert_eq!(resolve("ff").expect("exact"), "ff");
        let err = resolve("ab").expect_err("ambiguous");
        assert!(err.to_string().contains("ambiguous"), "{err}");
        assert!(err.to_string().contains("abc123") && err.to_string().contains("abd456"));
        let err = resolve("zz").expect_err("none");
        assert!(err.to_string().contains("no pod"), "{err}");
        resolve("").expect_err("empty");
    }
}

//! The image commands: `pull`, `images`, `rmi`.

use anyhow::{Context, bail};
use k8s_cri::v1 as cri;

use crate::client::{Cri, rpc_error};
use crate::configs::image_spec;
use crate::output::{format_table, human_size, image_names, row, short_image_id};

impl Cri {
    pub(crate) async fn pull(&mut self, image: &str, creds: Option<&str>) -> anyhow::Result<()> {
        let auth = creds.map(parse_creds).transpose()?;
        let image_ref = self
            .images
            .pull_image(cri::PullImageRequest {
                image: Some(image_spec(image)),
                auth,
                sandbox_config: None,
            })
            .await
            .map_err(rpc_error(format_args!("pull image {image:?}")))?
            .into_inner()
            .image_ref;
        println!("Image is up to date for {image_ref}");
        Ok(())
    }

    pub(crate) async fn images(&mut self, quiet: bool) -> anyhow::Result<()> {
        let mut images = self
            .images
            .list_images(cri::ListImagesRequest { filter: None })
            .await
            .map_err(rpc_error("list images"))?
            .into_inner()
            .images;
        if quiet {
            for i in &images {
                println!("{}", i.id);
            }
            return Ok(());
        }
        images.sort_by(|a, b| a.repo_tags.cmp(&b.repo_tags));
        let mut rows = vec![row(["IMAGE", "TAG", "IMAGE ID", "SIZE"])];
        for image in &images {
            for (repo, tag) in image_names(image) {
                rows.push(vec![
                    repo,
                    tag,
                    short_image_id(&image.id),
                    human_size(image.size),
                ]);
            }
        }
        print!("{}", format_table(&rows));
        Ok(())
    }

    pub(crate) async fn remove_image(&mut self, image: &str) -> anyhow::Result<()> {
        let found = self
            .images
            .image_status(cri::ImageStatusRequest {
                image: Some(image_spec(image)),
                verbose: false,
            })
            .await
            .map_err(rpc_error(format_args!("image status {image:?}")))?
            .into_inner()
            .image
            .with_context(|| format!("no such image {image:?}"))?;
        self.images
            .remove_image(cri::RemoveImageRequest {
                image: Some(image_spec(&found.id)),
            })
            .await
            .map_err(rpc_error(format_args!("remove image {image:?}")))?;
        if found.repo_tags.is_empty() {
            println!("Deleted: {}", found.id);
        }
        for tag in &found.repo_tags {
            println!("Deleted: {tag}");
        }
        Ok(())
    }
}

/// `--creds USER:PASS` as CRI credentials.
fn parse_creds(creds: &str) -> anyhow::Result<cri::AuthConfig> {
    let Some((user, pass)) = creds.split_once(':').filter(|(u, _)| !u.is_empty()) else {
        bail!("--creds must be USER:PASSWORD");
    };
    Ok(cri::AuthConfig {
        username: user.to_string(),
        password: pass.to_string(),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creds() {
        let auth = parse_creds("me:pa:ss").expect("creds");
        assert_eq!(
            (auth.username.as_str(), auth.password.as_str()),
            ("me", "pa:ss")
        );
        parse_creds("me").expect_err("no password");
        parse_creds(":x").expect_err("no user");
    }
}

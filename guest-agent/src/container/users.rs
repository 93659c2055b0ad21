//! Users and groups, resolved from the image's /etc/passwd and /etc/group.

use podvisor_proto::v1::User;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
    #[error("user {0:?} not found in the image's /etc/passwd")]
    UnknownUser(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEntry {
    pub name: String,
    pub gid: u32,
    pub members: Vec<String>,
}

/// Parses passwd(5) lines; malformed lines are skipped as libc does.
pub fn parse_passwd(s: &str) -> Vec<PasswdEntry> {
    s.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 7 || f[0].is_empty() {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_owned(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].to_owned(),
            })
        })
        .collect()
}

/// Parses group(5) lines; malformed lines are skipped.
pub fn parse_group(s: &str) -> Vec<GroupEntry> {
    s.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 4 || f[0].is_empty() {
                return None;
            }
            Some(GroupEntry {
                name: f[0].to_owned(),
                gid: f[2].parse().ok()?,
                members: f[3]
                    .split(',')
                    .map(str::trim)
                    .filter(|m| !m.is_empty())
                    .map(str::to_owned)
                    .collect(),
            })
        })
        .collect()
}

/// The identity a process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// Sorted, without duplicates.
    pub additional_gids: Vec<u32>,
    /// Home directory (for HOME when the request has none), "/" when unknown.
    pub home: String,
}

/// Resolves a request's user against the image's passwd and group contents (empty strings when
/// the files are missing). A numeric uid that is not in passwd is fine (gid 0 unless given); a
/// username that is not there is an error. Groups listing the user by name are added.
pub fn resolve(user: &User, passwd: &str, group: &str) -> Result<Identity, UserError> {
    let users = parse_passwd(passwd);
    let entry = if user.username.is_empty() {
        users.iter().find(|e| e.uid == user.uid)
    } else if let Some(e) = users.iter().find(|e| e.name == user.username) {
        Some(e)
    } else if let Ok(uid) = user.username.parse::<u32>() {
        // A numeric "username" is a uid, as in an image's `USER 1000`.
        users.iter().find(|e| e.uid == uid)
    } else {
        return Err(UserError::UnknownUser(user.username.clone()));
    };
    let uid = match entry {
        Some(e) => e.uid,
        None => user.username.parse().unwrap_or(user.uid),
    };
    let gid = user.gid.or(entry.map(|e| e.gid)).unwrap_or(0);
    let mut additional: Vec<u32> = user.additional_gids.clone();
    if let Some(e) = entry {
        additional.extend(
            parse_group(group)
                .into_iter()
                .filter(|g| g.members.contains(&e.name))
                .map(|g| g.gid),
        );
    }
    additional.sort_unstable();
    additional.dedup();
    Ok(Identity {
        uid,
        gid,
        additional_gids: additional,
        home: entry.map_or_else(|| "/".to_owned(), |e| e.home.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        # comment\n\
        broken line\n\
        nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n\
        app:x:1000:1001::/home/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nwheel:x:10:root,app\naudio:x:29: app \napp:x:1001:\nbad\n";

    #[test]
    fn parses_passwd_and_group() {
        let p = parse_passwd(PASSWD);
        assert_eq!(p.len(), 3);
        assert_eq!(p[2].name, "app");
        assert_eq!((p[2].uid, p[2].gid), (1000, 1001));
        let g = parse_group(GROUP);
        assert_eq!(g.len(), 4);
        assert_eq!(g[1].members, vec!["root", "app"]);
        assert_eq!(g[2].members, vec!["app"]);
    }

    #[test]
    fn resolves_names_and_ids() {
        let by_name = User {
            username: "app".into(),
            ..Default::default()
        };
        let id = resolve(&by_name, PASSWD, GROUP).expect("app");
        assert_eq!((id.uid, id.gid), (1000, 1001));
        assert_eq!(id.additional_gids, vec![10, 29]);
        assert_eq!(id.home, "/home/app");

        let explicit = User {
            username: "app".into(),
            gid: Some(5),
            additional_gids: vec![29, 7],
            ..Default::default()
        };
        let id = resolve(&explicit, PASSWD, GROUP).expect("app");
        assert_eq!(id.gid, 5);
        assert_eq!(id.additional_gids, vec![7, 10, 29]);

        let by_uid = User {
            uid: 4242,
            ..Default::default()
        };
        let id = resolve(&by_uid, PASSWD, GROUP).expect("uid");
        assert_eq!((id.uid, id.gid, id.home.as_str()), (4242, 0, "/"));

        let numeric = User {
            username: "1000".into(),
            ..Default::default()
        };
        assert_eq!(resolve(&numeric, PASSWD, GROUP).expect("1000").uid, 1000);
        let numeric_unknown = User {
            username: "777".into(),
            ..Default::default()
        };
        assert_eq!(resolve(&numeric_unknown, "", "").expect("777").uid, 777);

        let missing = User {
            username: "ghost".into(),
            ..Default::default()
        };
        assert_eq!(
            resolve(&missing, PASSWD, GROUP),
            Err(UserError::UnknownUser("ghost".into()))
        );
    }
}

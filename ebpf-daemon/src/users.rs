//! uid → login name, from the host's passwd file (`$HOST_ROOT/etc/passwd`), so that a daemon in
//! a container reports the host's users.

use std::{collections::HashMap, fs, path::PathBuf, time::SystemTime};

pub struct UserNames {
    passwd: PathBuf,
    names: HashMap<u32, String>,
    loaded: Option<SystemTime>,
}

impl UserNames {
    pub fn new(host_root: &std::path::Path) -> Self {
        Self {
            passwd: host_root.join("etc/passwd"),
            names: HashMap::new(),
            loaded: None,
        }
    }

    /// The login name of `uid`, or the uid as text when the passwd file does not name it.
    pub fn name(&mut self, uid: u32) -> String {
        if !self.names.contains_key(&uid) {
            self.reload_if_changed();
        }
        self.names
            .get(&uid)
            .cloned()
            .unwrap_or_else(|| uid.to_string())
    }

    fn reload_if_changed(&mut self) {
        let modified = fs::metadata(&self.passwd).and_then(|m| m.modified()).ok();
        if modified.is_some() && modified == self.loaded {
            return;
        }
        self.loaded = modified;
        if let Ok(text) = fs::read_to_string(&self.passwd) {
            self.names = parse_passwd(&text);
        }
    }
}

/// `name:password:uid:gid:gecos:home:shell` lines; the first entry of a uid wins, as getpwuid does.
fn parse_passwd(text: &str) -> HashMap<u32, String> {
    let mut names = HashMap::new();
    for line in text.lines() {
        let mut parts = line.split(':');
        if let (Some(name), Some(_), Some(uid)) = (parts.next(), parts.next(), parts.next())
            && let Ok(uid) = uid.parse()
            && !name.is_empty()
        {
            names.entry(uid).or_insert_with(|| name.to_string());
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_login_names_not_gecos() {
        let names = parse_passwd(
            "root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000:Alice Liddell,,,:/home/alice:/bin/bash\n#bad\ndup:x:0:0::/:/bin/sh\n",
        );
        assert_eq!(names[&0], "root");
        assert_eq!(names[&1000], "alice");
        assert_eq!(names.len(), 2);
    }

    #[test]
    fn unknown_uid_is_reported_as_number() {
        let dir = std::env::temp_dir().join(format!("users-test-{}", std::process::id()));
        fs::create_dir_all(dir.join("etc")).unwrap();
        fs::write(dir.join("etc/passwd"), "bob:x:1001:1001::/:/bin/sh\n").unwrap();
        let mut users = UserNames::new(&dir);
        assert_eq!(users.name(1001), "bob");
        assert_eq!(users.name(4242), "4242");
        fs::remove_dir_all(dir).unwrap();
    }
}

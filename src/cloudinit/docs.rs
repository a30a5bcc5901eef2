//! Renders the NoCloud seed documents: `meta-data`, `user-data`, `vendor-data`.
//!
//! Every string the driver writes into YAML is emitted as a double-quoted
//! scalar with JSON-compatible escapes (see [`yaml_quote`]), one list item per
//! line. That is valid YAML 1.1 (PyYAML, what cloud-init uses) and 1.2, and no
//! task setting can break out of its scalar to add keys or documents, whatever
//! newlines, quotes, `#`, `: ` or `---` it holds.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};

use super::password::{sha512_crypt, SALT_LEN};
use super::CloudInitError;

/// user-data when the task gives none: an empty cloud-config.
pub const DEFAULT_USER_DATA: &str = "#cloud-config\n{}\n";

/// Where vendor-data writes the task's environment for login shells.
pub const ENV_SCRIPT_PATH: &str = "/etc/profile.d/virt.sh";

/// Mode of [`ENV_SCRIPT_PATH`]: readable by root only.
pub const ENV_SCRIPT_MODE: &str = "0600";

/// What the driver knows about a task's guest setup.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct CloudInitInput {
    /// cloud-init runs per-instance modules once per id: a new id re-runs them.
    pub instance_id: String,
    /// RFC 1123 label (no dots).
    pub hostname: String,
    /// The already-resolved text of the user's user-data, passed through
    /// verbatim. `None`, empty or whitespace-only means "none given".
    pub user_data: Option<String>,
    /// Plaintext; only its SHA-512 crypt hash goes into the seed.
    pub default_user_password: Option<String>,
    /// One or more public keys for the default user, one per line; blank
    /// lines and `#` comment lines are ignored.
    pub ssh_authorized_key: Option<String>,
    /// sshd accepts password logins (cloud-init `ssh_pwauth`). Without it a
    /// password opens the console only, and sshd is told so explicitly.
    pub ssh_password_auth: bool,
    /// Run once per instance, after boot (`runcmd`), each through `sh -c`.
    pub cmds: Vec<String>,
    /// Run on every boot, early (`bootcmd`): the driver's mount commands.
    pub bootcmds: Vec<String>,
    /// IANA zone name such as `Europe/Berlin`.
    pub timezone: Option<String>,
    /// Exported by `/etc/profile.d/virt.sh`. Names that are not shell
    /// identifiers, and values holding NUL, are skipped: see [`skipped_env_names`].
    pub env: BTreeMap<String, String>,
}

/// Hand-written so that logging a task's input never prints the password or
/// env values (which often carry secrets), nor user-data's content.
impl fmt::Debug for CloudInitInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CloudInitInput")
            .field("instance_id", &self.instance_id)
            .field("hostname", &self.hostname)
            .field(
                "user_data",
                &self
                    .user_data
                    .as_ref()
                    .map(|u| format!("<{} bytes>", u.len())),
            )
            .field(
                "default_user_password",
                &self.default_user_password.as_ref().map(|_| "<redacted>"),
            )
            .field("ssh_authorized_key", &self.ssh_authorized_key)
            .field("ssh_password_auth", &self.ssh_password_auth)
            .field("cmds", &self.cmds)
            .field("bootcmds", &self.bootcmds)
            .field("timezone", &self.timezone)
            .field("env_names", &self.env.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// The three files at the root of the `cidata` ISO.
#[derive(Clone, PartialEq, Eq)]
pub struct SeedFiles {
    pub meta_data: String,
    pub user_data: String,
    pub vendor_data: String,
}

/// Sizes only: vendor-data holds env values and user-data may hold secrets.
impl fmt::Debug for SeedFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SeedFiles")
            .field("meta_data", &self.meta_data)
            .field("user_data_bytes", &self.user_data.len())
            .field("vendor_data_bytes", &self.vendor_data.len())
            .finish()
    }
}

/// Renders the seed files. Pure: the caller supplies the password salt
/// (normally [`super::password::random_salt`]), so equal inputs give equal output.
///
/// vendor-data carries the driver's settings. cloud-init merges it *under*
/// user-data: a top-level key present in the user's cloud-config replaces the
/// driver's whole value for that key, lists included (so a user `runcmd`
/// replaces the task's `cmds`, a user `bootcmd` the mount commands, a user
/// `write_files` the env script). A `merge_how` in vendor-data cannot change
/// that: cloud-init strips it while reading the vendor part.
pub fn render(
    input: &CloudInitInput,
    password_salt: [u8; SALT_LEN],
) -> Result<SeedFiles, CloudInitError> {
    validate_instance_id(&input.instance_id)?;
    if !is_valid_hostname(&input.hostname) {
        return Err(CloudInitError::InvalidHostname {
            hostname: input.hostname.clone(),
        });
    }
    if let Some(tz) = &input.timezone {
        if !is_valid_timezone(tz) {
            return Err(CloudInitError::InvalidTimezone {
                timezone: tz.clone(),
            });
        }
    }

    let meta_data = format!(
        "instance-id: {}\nlocal-hostname: {}\n",
        yaml_quote(&input.instance_id),
        yaml_quote(&input.hostname)
    );

    let user_data = match &input.user_data {
        Some(text) if !text.trim().is_empty() => text.clone(),
        _ => DEFAULT_USER_DATA.to_owned(),
    };

    Ok(SeedFiles {
        meta_data,
        user_data,
        vendor_data: render_vendor_data(input, password_salt)?,
    })
}

fn render_vendor_data(
    input: &CloudInitInput,
    salt: [u8; SALT_LEN],
) -> Result<String, CloudInitError> {
    let mut doc = Doc::new();
    doc.string("hostname", &input.hostname);

    if let Some(password) = &input.default_user_password {
        if password.is_empty() {
            return Err(CloudInitError::EmptyPassword);
        }
        // A `$6$` value makes cloud-init call `chpasswd -e`: the hash is stored
        // as-is, the plaintext never leaves the host.
        doc.string("password", &sha512_crypt(password, salt)?);
        doc.raw("chpasswd:\n  expire: false\n");
        // Explicit either way: images whose sshd takes passwords by
        // default must not do so just because a password was set.
        doc.raw(&format!("ssh_pwauth: {}\n", input.ssh_password_auth));
    } else if input.ssh_password_auth {
        // Passwords set by the user's own user-data.
        doc.raw("ssh_pwauth: true\n");
    }

    let keys = ssh_keys(input.ssh_authorized_key.as_deref());
    doc.list("ssh_authorized_keys", &keys);

    if let Some(tz) = &input.timezone {
        doc.string("timezone", tz);
    }
    doc.list("bootcmd", &input.bootcmds);
    doc.list("runcmd", &input.cmds);

    if let Some(script) = env_script(&input.env) {
        // 0600 root: env values often carry secrets (template env = true),
        // so no other guest user may read them. Login shells of other users
        // skip it (/etc/profile sources only readable files); root's and
        // `cmds` (run as root) get it.
        doc.raw("write_files:\n");
        doc.raw(&format!("  - path: {}\n", yaml_quote(ENV_SCRIPT_PATH)));
        doc.raw("    owner: \"root:root\"\n");
        doc.raw(&format!("    permissions: \"{ENV_SCRIPT_MODE}\"\n"));
        doc.raw(&format!("    content: {}\n", yaml_quote(&script)));
    }
    Ok(doc.finish())
}

/// Block-style YAML builder for a `#cloud-config` document whose keys are
/// fixed by the driver and whose string values are always quoted.
struct Doc(String);

impl Doc {
    fn new() -> Self {
        Doc(String::from("#cloud-config\n"))
    }

    fn raw(&mut self, text: &str) {
        self.0.push_str(text);
    }

    fn string(&mut self, key: &str, value: &str) {
        let _ = writeln!(self.0, "{key}: {}", yaml_quote(value));
    }

    /// Omits the key entirely for an empty list.
    fn list<S: AsRef<str>>(&mut self, key: &str, items: &[S]) {
        if items.is_empty() {
            return;
        }
        let _ = writeln!(self.0, "{key}:");
        for item in items {
            let _ = writeln!(self.0, "  - {}", yaml_quote(item.as_ref()));
        }
    }

    fn finish(self) -> String {
        self.0
    }
}

fn ssh_keys(text: Option<&str>) -> Vec<&str> {
    text.unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

/// The profile script vendor-data writes to [`ENV_SCRIPT_PATH`]: one
/// `export NAME='value'` line per variable [`render`] keeps, or `None` when
/// none survives filtering (see [`skipped_env_names`]).
pub fn env_script(env: &BTreeMap<String, String>) -> Option<String> {
    let mut script = String::new();
    for (name, value) in env.iter().filter(|(n, v)| env_var_is_kept(n, v)) {
        let _ = writeln!(script, "export {name}={}", shell_single_quote(value));
    }
    if script.is_empty() {
        return None;
    }
    Some(format!(
        "# Task environment, written by nomad-driver-virt.\n{script}"
    ))
}

fn env_var_is_kept(name: &str, value: &str) -> bool {
    // A NUL cannot be part of a real environment value, and shells drop it.
    is_valid_env_name(name) && !value.contains('\0')
}

/// Names of the env vars that [`render`] leaves out of the profile script:
/// names that are not shell identifiers (`export a.b=…` is a shell error that
/// would stop the script) and values holding NUL. The caller should log them.
pub fn skipped_env_names(env: &BTreeMap<String, String>) -> Vec<String> {
    env.iter()
        .filter(|(n, v)| !env_var_is_kept(n, v))
        .map(|(n, _)| n.clone())
        .collect()
}

/// `[A-Za-z_][A-Za-z0-9_]*`, the names POSIX `export` accepts.
pub fn is_valid_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// RFC 1123 label: 1–63 ASCII letters, digits and `-`, with no `-` at either end.
pub fn is_valid_hostname(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

fn is_valid_timezone(tz: &str) -> bool {
    // cloud-init joins the name onto /usr/share/zoneinfo, so no traversal.
    !tz.is_empty()
        && tz
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'-' | b'+'))
        && tz
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
}

fn validate_instance_id(id: &str) -> Result<(), CloudInitError> {
    let reason = if id.is_empty() {
        return Err(CloudInitError::EmptyInstanceId);
    } else if id == "." || id == ".." {
        "it must not be \".\" or \"..\""
    } else if id.contains('/') {
        "it must not contain '/' (cloud-init uses it as a directory name)"
    } else if id.chars().any(char::is_control) {
        "it must not contain control characters"
    } else {
        return Ok(());
    };
    Err(CloudInitError::InvalidInstanceId {
        instance_id: id.to_owned(),
        reason,
    })
}

/// POSIX shell single quoting: `'` becomes `'\''`. Everything else, newlines
/// included, is literal inside single quotes.
pub fn shell_single_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// A YAML double-quoted scalar using only escapes JSON also has (`\"`, `\\`,
/// `\n`, `\r`, `\t`, `\uXXXX`), so it is valid JSON and YAML 1.1/1.2 alike.
///
/// Beyond what JSON requires, it also escapes the characters YAML 1.1 treats
/// as line breaks (U+0085, U+2028, U+2029) or refuses as non-printable
/// (DEL, C1 controls, U+FEFF, U+FFFE, U+FFFF): PyYAML would otherwise fold or
/// reject them. Other non-ASCII characters stay as UTF-8 (above U+FFFF JSON
/// would need surrogate pairs, which YAML's `\u` does not decode).
pub fn yaml_quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{0}'..='\u{1f}'
            | '\u{7f}'..='\u{9f}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{feff}'
            | '\u{fffe}'
            | '\u{ffff}' => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_norway::Value;

    const SALT: [u8; 12] = *b"fixed-salt!!";

    fn input() -> CloudInitInput {
        CloudInitInput {
            instance_id: "nomad-1234abcd-web".into(),
            hostname: "web-1".into(),
            ..Default::default()
        }
    }

    fn yaml(text: &str) -> Value {
        serde_norway::from_str(text).unwrap_or_else(|e| panic!("invalid YAML ({e}):\n{text}"))
    }

    fn strings(v: &Value) -> Vec<String> {
        v.as_sequence()
            .expect("a YAML list")
            .iter()
            .map(|s| s.as_str().expect("a string item").to_owned())
            .collect()
    }

    /// Strings that try every way out of a YAML scalar or a shell quote.
    fn hostile() -> Vec<String> {
        [
            "echo \"hi\"",
            "a\nruncmd: [\"rm -rf /\"]\n",
            "x\n---\npassword: owned\n...",
            "# comment? \" # not",
            "key: value",
            "- item",
            "{flow: map}",
            "[1, 2]",
            "&anchor *alias !!python/object:os.system",
            "'single' and \\back\\slash \\n",
            "tab\there\r\nCRLF",
            "nul\0bell\x07esc\x1bdel\x7f",
            "c1\u{85}nel\u{2028}ls\u{2029}ps\u{feff}bom\u{9b}csi",
            "unicode é 中文 🚀",
            "",
            "   leading and trailing   ",
            "yes",
            "~",
            "null",
            "0644",
            "'; echo pwned; '",
            "$(id) `id` ${HOME}",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    #[test]
    fn meta_data_has_id_and_hostname() {
        let seed = render(&input(), SALT).unwrap();
        assert_eq!(
            seed.meta_data,
            "instance-id: \"nomad-1234abcd-web\"\nlocal-hostname: \"web-1\"\n"
        );
        let v = yaml(&seed.meta_data);
        assert_eq!(v["instance-id"].as_str(), Some("nomad-1234abcd-web"));
        assert_eq!(v["local-hostname"].as_str(), Some("web-1"));
    }

    #[test]
    fn user_data_is_verbatim_or_default() {
        let own = "#cloud-config\nruncmd:\n  - echo mine   # keep me\n\n";
        let mut i = input();
        i.user_data = Some(own.into());
        assert_eq!(render(&i, SALT).unwrap().user_data, own);

        // Non-cloud-config formats pass through too.
        i.user_data = Some("#!/bin/sh\necho hi\n".into());
        assert_eq!(render(&i, SALT).unwrap().user_data, "#!/bin/sh\necho hi\n");

        for absent in [None, Some(String::new()), Some(" \n\t\n".into())] {
            i.user_data = absent;
            let ud = render(&i, SALT).unwrap().user_data;
            assert_eq!(ud, DEFAULT_USER_DATA);
            assert!(yaml(&ud).as_mapping().unwrap().is_empty());
        }
    }

    #[test]
    fn minimal_vendor_data_sets_only_hostname() {
        let seed = render(&input(), SALT).unwrap();
        assert_eq!(seed.vendor_data, "#cloud-config\nhostname: \"web-1\"\n");
    }

    #[test]
    fn full_vendor_data_shape() {
        let mut i = input();
        i.default_user_password = Some("s3cret".into());
        i.ssh_authorized_key = Some("ssh-ed25519 AAAAC3 me@host\n".into());
        i.timezone = Some("Europe/Berlin".into());
        i.bootcmds = vec!["mkdir -p /srv".into()];
        i.cmds = vec!["echo \"hi\"".into()];
        i.env = BTreeMap::from([("GREETING".into(), "it's".into())]);
        let vd = render(&i, SALT).unwrap().vendor_data;
        let hash = sha512_crypt("s3cret", SALT).unwrap();
        let expected = format!(
            "#cloud-config\n\
             hostname: \"web-1\"\n\
             password: \"{hash}\"\n\
             chpasswd:\n  expire: false\n\
             ssh_pwauth: false\n\
             ssh_authorized_keys:\n  - \"ssh-ed25519 AAAAC3 me@host\"\n\
             timezone: \"Europe/Berlin\"\n\
             bootcmd:\n  - \"mkdir -p /srv\"\n\
             runcmd:\n  - \"echo \\\"hi\\\"\"\n\
             write_files:\n\
            \x20 - path: \"/etc/profile.d/virt.sh\"\n\
            \x20   owner: \"root:root\"\n\
            \x20   permissions: \"0600\"\n\
            \x20   content: \"# Task environment, written by nomad-driver-virt.\\nexport GREETING='it'\\\\''s'\\n\"\n"
        );
        assert_eq!(vd, expected);

        let v = yaml(&vd);
        assert_eq!(v["chpasswd"]["expire"].as_bool(), Some(false));
        assert_eq!(v["ssh_pwauth"].as_bool(), Some(false));
        assert_eq!(v["write_files"][0]["permissions"].as_str(), Some("0600"));
        assert_eq!(v["write_files"][0]["owner"].as_str(), Some("root:root"));
    }

    #[test]
    fn hostile_strings_round_trip_without_injecting_keys() {
        let mut i = input();
        i.cmds = hostile();
        i.bootcmds = hostile().into_iter().rev().collect();
        i.timezone = Some("America/Argentina/Buenos_Aires".into());
        let seed = render(&i, SALT).unwrap();
        let v = yaml(&seed.vendor_data);

        let keys: Vec<&str> = v
            .as_mapping()
            .unwrap()
            .keys()
            .map(|k| k.as_str().unwrap())
            .collect();
        assert_eq!(keys, ["hostname", "timezone", "bootcmd", "runcmd"]);
        assert_eq!(strings(&v["runcmd"]), i.cmds);
        assert_eq!(strings(&v["bootcmd"]), i.bootcmds);
        assert_eq!(v["timezone"].as_str(), i.timezone.as_deref());

        // One physical line per item: a line-by-line reader needs no YAML parser.
        let lines = seed.vendor_data.lines().count();
        assert_eq!(lines, 1 + 1 + 1 + 1 + i.bootcmds.len() + 1 + i.cmds.len());
        assert!(seed
            .vendor_data
            .lines()
            .skip(1)
            .all(|l| l.starts_with("  - \"") || !l.starts_with(' ')));
    }

    #[test]
    fn yaml_quote_round_trips_every_hostile_string_and_is_json() {
        for s in hostile() {
            let q = yaml_quote(&s);
            assert!(!q.contains('\n') && !q.contains('\r'), "{q}");
            let back: String = serde_norway::from_str(&q).unwrap();
            assert_eq!(back, s);
            let json: String = serde_json::from_str(&q).unwrap();
            assert_eq!(json, s);
        }
    }

    #[test]
    fn ssh_keys_one_per_line_ignoring_blanks_and_comments() {
        let mut i = input();
        i.ssh_authorized_key =
            Some("# laptop\nssh-ed25519 AAAA one\n\n  ssh-rsa BBBB two  \r\n".into());
        let v = yaml(&render(&i, SALT).unwrap().vendor_data);
        assert_eq!(
            strings(&v["ssh_authorized_keys"]),
            ["ssh-ed25519 AAAA one", "ssh-rsa BBBB two"]
        );
        i.ssh_authorized_key = Some("\n# only a comment\n".into());
        let v = yaml(&render(&i, SALT).unwrap().vendor_data);
        assert!(v.get("ssh_authorized_keys").is_none());
    }

    #[test]
    fn password_is_hashed_never_clear() {
        let password = "Tr0ub4dor&3-very-distinctive";
        let mut i = input();
        i.default_user_password = Some(password.into());
        let seed = render(&i, SALT).unwrap();
        for file in [&seed.meta_data, &seed.user_data, &seed.vendor_data] {
            assert!(!file.contains(password), "password in clear:\n{file}");
        }
        let v = yaml(&seed.vendor_data);
        let hash = v["password"].as_str().unwrap();
        assert!(hash.starts_with("$6$rounds=5000$"), "{hash}");
        assert_eq!(hash, sha512_crypt(password, SALT).unwrap());
        // The salt, not the clock or an RNG, decides the output.
        assert_eq!(render(&i, SALT).unwrap(), seed);
        assert_ne!(render(&i, [0; 12]).unwrap(), seed);
        assert!(!format!("{i:?}").contains(password));
        assert!(!format!("{seed:?}").contains("$6$"));
    }

    #[test]
    fn no_password_means_no_password_keys() {
        let v = yaml(&render(&input(), SALT).unwrap().vendor_data);
        for key in ["password", "chpasswd", "ssh_pwauth"] {
            assert!(v.get(key).is_none(), "{key} set without a password");
        }
    }

    #[test]
    fn password_ssh_login_only_when_asked() {
        let mut i = input();
        i.default_user_password = Some("pw".into());
        let v = yaml(&render(&i, SALT).unwrap().vendor_data);
        assert_eq!(
            v["ssh_pwauth"].as_bool(),
            Some(false),
            "a password alone must close SSH password login"
        );
        i.ssh_password_auth = true;
        let v = yaml(&render(&i, SALT).unwrap().vendor_data);
        assert_eq!(v["ssh_pwauth"].as_bool(), Some(true));
        // Asked for without a password here (user-data sets one).
        let mut i = input();
        i.ssh_password_auth = true;
        let v = yaml(&render(&i, SALT).unwrap().vendor_data);
        assert_eq!(v["ssh_pwauth"].as_bool(), Some(true));
        assert!(v.get("password").is_none());
    }

    #[test]
    fn env_file_is_root_only() {
        let mut i = input();
        i.env = BTreeMap::from([("TOKEN".into(), "secret".into())]);
        let v = yaml(&render(&i, SALT).unwrap().vendor_data);
        let file = &v["write_files"][0];
        assert_eq!(file["path"].as_str(), Some(ENV_SCRIPT_PATH));
        assert_eq!(file["owner"].as_str(), Some("root:root"));
        let mode = u32::from_str_radix(file["permissions"].as_str().unwrap(), 8).unwrap();
        assert_eq!(mode & 0o077, 0, "group or others can read {mode:o}");
    }

    #[test]
    fn empty_password_is_rejected() {
        let mut i = input();
        i.default_user_password = Some(String::new());
        assert!(matches!(
            render(&i, SALT),
            Err(CloudInitError::EmptyPassword)
        ));
    }

    /// Runs the generated profile script in a real shell and reads the values back.
    #[test]
    fn env_script_exports_exact_values_in_sh() {
        let mut env: BTreeMap<String, String> = hostile()
            .into_iter()
            .filter(|v| !v.contains('\0'))
            .enumerate()
            .map(|(n, v)| (format!("V_{n}"), v))
            .collect();
        env.insert("_lower_ok9".into(), "x".into());
        let mut i = input();
        i.env = env.clone();
        let v = yaml(&render(&i, SALT).unwrap().vendor_data);
        let script = v["write_files"][0]["content"].as_str().unwrap();

        for (name, value) in &env {
            // printf %s keeps trailing newlines and backslashes intact.
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("{script}\nprintf %s \"${name}\""))
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            assert_eq!(String::from_utf8(out.stdout).unwrap(), *value, "{name}");
        }
    }

    #[test]
    fn bad_env_names_are_skipped_and_reported() {
        let mut i = input();
        i.env = BTreeMap::from([
            ("GOOD".into(), "1".into()),
            ("1BAD".into(), "x".into()),
            ("BAD-NAME".into(), "x".into()),
            ("a.b".into(), "x".into()),
            ("X;rm -rf /".into(), "x".into()),
            ("".into(), "x".into()),
            ("NULVAL".into(), "a\0b".into()),
        ]);
        let v = yaml(&render(&i, SALT).unwrap().vendor_data);
        let script = v["write_files"][0]["content"].as_str().unwrap();
        assert_eq!(
            script,
            "# Task environment, written by nomad-driver-virt.\nexport GOOD='1'\n"
        );
        assert_eq!(
            skipped_env_names(&i.env),
            ["", "1BAD", "BAD-NAME", "NULVAL", "X;rm -rf /", "a.b"]
        );

        // Nothing left to export: no write_files at all.
        i.env.remove("GOOD");
        let v = yaml(&render(&i, SALT).unwrap().vendor_data);
        assert!(v.get("write_files").is_none());
    }

    #[test]
    fn hostname_must_be_an_rfc1123_label() {
        for ok in ["a", "web-1", "A1", &"x".repeat(63)] {
            assert!(is_valid_hostname(ok), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "a.b",
            "a_b",
            "a b",
            "é",
            "a\n",
            &"x".repeat(64),
        ] {
            let mut i = input();
            i.hostname = bad.into();
            match render(&i, SALT) {
                Err(CloudInitError::InvalidHostname { hostname }) => assert_eq!(hostname, bad),
                other => panic!("{bad:?} accepted: {other:?}"),
            }
        }
    }

    #[test]
    fn instance_id_is_validated() {
        let mut i = input();
        i.instance_id = String::new();
        assert!(matches!(
            render(&i, SALT),
            Err(CloudInitError::EmptyInstanceId)
        ));
        for bad in [".", "..", "a/b", "a\nb", "a\0b"] {
            i.instance_id = bad.into();
            assert!(
                matches!(
                    render(&i, SALT),
                    Err(CloudInitError::InvalidInstanceId { .. })
                ),
                "{bad:?}"
            );
        }
        // Anything else is just quoted.
        i.instance_id = "id: with \"quotes\" #".into();
        let v = yaml(&render(&i, SALT).unwrap().meta_data);
        assert_eq!(v["instance-id"].as_str(), Some("id: with \"quotes\" #"));
    }

    #[test]
    fn timezone_is_validated() {
        for ok in ["UTC", "Etc/GMT+5", "America/Port-au-Prince"] {
            let mut i = input();
            i.timezone = Some(ok.into());
            assert!(render(&i, SALT).is_ok(), "{ok}");
        }
        for bad in ["", "../../etc/passwd", "Europe/", "/UTC", "a b", "UTC\n"] {
            let mut i = input();
            i.timezone = Some(bad.into());
            assert!(
                matches!(
                    render(&i, SALT),
                    Err(CloudInitError::InvalidTimezone { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn errors_name_the_setting() {
        let mut i = input();
        i.hostname = "bad_host".into();
        let msg = render(&i, SALT).unwrap_err().to_string();
        assert!(
            msg.contains("bad_host") && msg.contains("RFC 1123"),
            "{msg}"
        );
    }
}

//! The pure iptables rule model: which chains the driver owns, which rules a
//! port forward needs, the `iptables-restore` text that adds or deletes them,
//! and the parsing of `iptables-save` output that removal and reconciliation
//! work from. No I/O happens here, so every shape is unit-tested exactly.
//!
//! Layout: five shared chains (created once by `init`, jumped to from the
//! built-in chains) and, per task, five chains of its own named from a hash
//! of the task's tag ([`task_chain`]), each reached by one jump from its
//! shared chain. Every rule and every jump carries `-m comment --comment
//! <tag>`. Adding a task is one batch that creates its chains, fills them
//! and adds the five jumps; removing it deletes exactly those jumps and
//! chains, which needs no listing of the other tasks' rules, so both cost
//! the same whatever else is installed.
//!
//! Rules of the previous layout (tagged rules directly in the shared chains)
//! are still found and removed by tag.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// The nat table.
pub const NAT: &str = "nat";
/// The filter table.
pub const FILTER: &str = "filter";

/// nat chain jumped from PREROUTING: DNAT for traffic from other hosts.
pub const CHAIN_PRT: &str = "NOMAD_VT_PRT";
/// nat chain jumped from OUTPUT: DNAT for connections made on the host itself.
pub const CHAIN_OUT: &str = "NOMAD_VT_OUT";
/// nat chain jumped from POSTROUTING: MASQUERADE for loopback forwards.
pub const CHAIN_PST: &str = "NOMAD_VT_PST";
/// filter chain jumped from FORWARD: lets forwarded traffic reach the guest
/// before libvirt's own FORWARD rules reject it.
pub const CHAIN_FW: &str = "NOMAD_VT_FW";
/// filter chain jumped from INPUT for traffic to 127.0.0.0/8 that did not
/// come in on `lo`: with `route_localnet` on a bridge, guests could reach
/// the host's loopback services (CVE-2020-8558); each task's chain here drops
/// what arrives from its bridge unless our DNAT sent it.
pub const CHAIN_IN: &str = "NOMAD_VT_IN";

/// The match in front of `-j NOMAD_VT_IN` in INPUT, so that ordinary input
/// traffic never walks the per-task chains.
pub const IN_JUMP_MATCH: [&str; 5] = ["-d", "127.0.0.0/8", "!", "-i", "lo"];

/// Prefix of every chain name the driver creates.
pub const CHAIN_PREFIX: &str = "NOMAD_VT_";

/// Every tag this driver writes starts with this; reconciliation only ever
/// touches rules whose tag has it.
pub const TAG_PREFIX: &str = "nomad-driver-virt:";

/// Longest tag accepted. The kernel allows 255 bytes in a comment; 200
/// leaves room and keeps `iptables-save` lines readable.
pub const MAX_TAG_LEN: usize = 200;

/// The driver's chains as `(table, chain, parent chain)`. The parent jumps to
/// the chain from position 1.
pub fn base_chains() -> Vec<(&'static str, &'static str, &'static str)> {
    vec![
        (NAT, CHAIN_PRT, "PREROUTING"),
        (NAT, CHAIN_OUT, "OUTPUT"),
        (NAT, CHAIN_PST, "POSTROUTING"),
        (FILTER, CHAIN_FW, "FORWARD"),
        (FILTER, CHAIN_IN, "INPUT"),
    ]
}

/// The arguments of the jump from `parent` to the shared `chain`, after
/// `-A <parent>`, exactly as `iptables-save` prints them.
pub fn parent_jump_args(chain: &str) -> Vec<String> {
    let mut args: Vec<String> = if chain == CHAIN_IN {
        IN_JUMP_MATCH.iter().map(|a| a.to_string()).collect()
    } else {
        Vec::new()
    };
    args.push("-j".into());
    args.push(chain.into());
    args
}

/// Which shared chain each per-task chain hangs off, and the one-letter
/// suffix of its name. Every task with rules gets all five (some may stay
/// empty), so removal knows the exact set from the tag alone.
pub const TASK_CHAINS: [(&str, &str, char); 5] = [
    (NAT, CHAIN_PRT, 'P'),
    (NAT, CHAIN_OUT, 'O'),
    (NAT, CHAIN_PST, 'S'),
    (FILTER, CHAIN_FW, 'F'),
    (FILTER, CHAIN_IN, 'I'),
];

/// The per-task chain below shared chain `shared` for `tag`:
/// `NOMAD_VT_<16 hex digits of FNV-1a(tag)>_<suffix>`, 27 characters, within
/// iptables' 28. `None` if `shared` is not one of the shared chains.
pub fn task_chain(tag: &str, shared: &str) -> Option<String> {
    let (_, _, suffix) = TASK_CHAINS.iter().find(|(_, s, _)| *s == shared)?;
    Some(format!(
        "{CHAIN_PREFIX}{:016x}_{suffix}",
        fnv1a64(tag.as_bytes())
    ))
}

/// Whether `chain` has the shape of a per-task chain name in `table`.
pub fn is_task_chain(table: &str, chain: &str) -> bool {
    let Some(rest) = chain.strip_prefix(CHAIN_PREFIX) else {
        return false;
    };
    let Some((hash, suffix)) = rest.split_once('_') else {
        return false;
    };
    hash.len() == 16
        && hash
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        && TASK_CHAINS
            .iter()
            .any(|(t, _, s)| *t == table && suffix.len() == 1 && suffix.starts_with(*s))
}

/// The jump from shared chain `shared` into the task's chain `chain`, as
/// `-A`/`-D` arguments after the chain name.
pub fn task_jump_args(tag: &str, chain: &str) -> Vec<String> {
    ["-m", "comment", "--comment", tag, "-j", chain]
        .iter()
        .map(|a| a.to_string())
        .collect()
}

/// `iptables-restore` input that removes every per-task chain of `tag` and
/// the jumps to them: per table the jumps first (a referenced chain cannot
/// be deleted), then flush, then delete. Fails as a whole (per table) when
/// any of them is missing; the caller then falls back to removing what
/// exists.
pub fn task_removal_batch(tag: &str) -> String {
    let mut out = String::new();
    for table in our_tables() {
        let mut jumps = Vec::new();
        let mut flushes = Vec::new();
        let mut deletes = Vec::new();
        for (_, shared, _) in TASK_CHAINS.iter().filter(|(t, ..)| *t == table) {
            let Some(chain) = task_chain(tag, shared) else {
                continue;
            };
            let args: Vec<String> = task_jump_args(tag, &chain)
                .iter()
                .map(|a| quote_arg(a))
                .collect();
            jumps.push(format!("-D {shared} {}", args.join(" ")));
            flushes.push(format!("-F {chain}"));
            deletes.push(format!("-X {chain}"));
        }
        jumps.extend(flushes);
        jumps.extend(deletes);
        out.push_str(&table_batch(table, &jumps));
    }
    out
}

/// The driver's chains in `table` (empty for tables it does not use).
pub fn chains_in_table(table: &str) -> Vec<&'static str> {
    base_chains()
        .into_iter()
        .filter(|(t, _, _)| *t == table)
        .map(|(_, chain, _)| chain)
        .collect()
}

/// Whether `chain` in `table` is one of the driver's shared chains.
pub fn is_our_chain(table: &str, chain: &str) -> bool {
    chains_in_table(table).contains(&chain)
}

/// The tables holding the driver's chains, in the order batches use.
pub fn our_tables() -> Vec<&'static str> {
    let mut tables: Vec<&'static str> = Vec::new();
    for (table, _, _) in base_chains() {
        if !tables.contains(&table) {
            tables.push(table);
        }
    }
    tables
}

/// One rule: `args` is everything after `-A <chain>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IptablesRule {
    pub table: String,
    pub chain: String,
    pub args: Vec<String>,
}

/// One host port forwarded to the guest (both tcp and udp).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortForward {
    /// The Nomad port label; only used in error messages.
    pub label: String,
    pub host_ip: Ipv4Addr,
    pub host_port: u16,
    pub guest_port: u16,
}

/// Whether a batch adds or deletes its rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchOp {
    Append,
    Delete,
}

impl BatchOp {
    fn flag(self) -> &'static str {
        match self {
            BatchOp::Append => "-A",
            BatchOp::Delete => "-D",
        }
    }
}

/// A rule or its inputs that must not reach iptables.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("the rule tag is empty")]
    EmptyTag,
    #[error("the rule tag is {len} characters long; at most {MAX_TAG_LEN} are allowed")]
    TagTooLong { len: usize },
    #[error(
        "the rule tag {tag:?} contains {bad:?}; only letters, digits and . _ : / = - are allowed"
    )]
    TagCharacter { tag: String, bad: char },
    #[error("the rule tag {0:?} must not start with '-'")]
    TagLeadingDash(String),
    #[error(
        "bridge {0:?} is not a valid Linux interface name (1-15 letters, digits, '_', '.', '-')"
    )]
    InvalidBridge(String),
    #[error("port forward {label:?}: the {which} port is 0")]
    ZeroPort { label: String, which: &'static str },
    #[error("port forward {label:?}: host address {host_ip} cannot be forwarded (unspecified, broadcast or multicast)")]
    InvalidHostIp { label: String, host_ip: Ipv4Addr },
    #[error("port forward {label:?}: {host_ip}:{host_port} is forwarded twice")]
    DuplicateForward {
        label: String,
        host_ip: Ipv4Addr,
        host_port: u16,
    },
    #[error("guest address {0} is not a unicast address a guest can have")]
    InvalidGuestIp(Ipv4Addr),
    #[error("table {table:?} chain {chain:?} is not one of the driver's chains")]
    ForeignChain { table: String, chain: String },
    #[error("rule argument {arg:?} in chain {chain} is empty or contains a control character")]
    BadArgument { chain: String, arg: String },
}

fn is_tag_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '/' | '=' | '-')
}

/// Checks a tag: it ends up as one argument of `--comment`, so it must not be
/// able to end the argument, the line, or look like an option.
pub fn validate_tag(tag: &str) -> Result<(), RuleError> {
    if tag.is_empty() {
        return Err(RuleError::EmptyTag);
    }
    let len = tag.chars().count();
    if len > MAX_TAG_LEN {
        return Err(RuleError::TagTooLong { len });
    }
    if let Some(bad) = tag.chars().find(|c| !is_tag_char(*c)) {
        return Err(RuleError::TagCharacter {
            tag: tag.to_string(),
            bad,
        });
    }
    if tag.starts_with('-') {
        return Err(RuleError::TagLeadingDash(tag.to_string()));
    }
    Ok(())
}

/// The tag for a task's rules: `nomad-driver-virt:<task id>`, with characters
/// outside the tag alphabet replaced by `_`. Overlong IDs are cut and get a
/// hash of the full ID appended, so the result is always a valid tag and
/// distinct IDs stay distinct.
pub fn task_tag(task_id: &str) -> String {
    let sanitised: String = task_id
        .chars()
        .map(|c| if is_tag_char(c) { c } else { '_' })
        .collect();
    let tag = format!("{TAG_PREFIX}{sanitised}");
    if tag.len() <= MAX_TAG_LEN {
        return tag;
    }
    // All characters are ASCII now, so byte slicing is safe.
    let suffix = format!("-{:016x}", fnv1a64(task_id.as_bytes()));
    let mut cut = tag[..MAX_TAG_LEN - suffix.len()].to_string();
    cut.push_str(&suffix);
    cut
}

/// FNV-1a: stable across releases (unlike `DefaultHasher`), which matters
/// because tags written by one plugin version are reconciled by the next.
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// A Linux interface name: at most 15 bytes of `[A-Za-z0-9_.-]`, not `.`/`..`.
pub fn is_valid_interface_name(name: &str) -> bool {
    crate::net::config::is_valid_device_name(name)
}

/// Checks that a rule targets one of the driver's chains (shared or
/// per-task) and that no argument can break out of its place in an
/// `iptables-restore` line.
pub fn validate_rule(rule: &IptablesRule) -> Result<(), RuleError> {
    if !is_our_chain(&rule.table, &rule.chain) && !is_task_chain(&rule.table, &rule.chain) {
        return Err(RuleError::ForeignChain {
            table: rule.table.clone(),
            chain: rule.chain.clone(),
        });
    }
    for arg in &rule.args {
        if arg.is_empty() || arg.chars().any(char::is_control) {
            return Err(RuleError::BadArgument {
                chain: rule.chain.clone(),
                arg: arg.clone(),
            });
        }
    }
    Ok(())
}

/// The rules forwarding each of `forwards` (tcp and udp) to `guest_ip`
/// behind `bridge`, all tagged with `tag`: the contents of the task's five
/// chains (see [`task_chain`]) followed by the five jumps into them. Empty
/// when there is nothing to forward.
///
/// A non-loopback host address gets a DNAT in the task's PREROUTING chain
/// (other hosts) and the same DNAT in its OUTPUT chain (the host itself; an
/// open bug in the Go driver). A loopback address gets a DNAT in the OUTPUT
/// chain only and a MASQUERADE in the POSTROUTING chain, since a 127/8
/// source cannot leave through the bridge. The FORWARD chain accepts
/// connections to the guest port only when our DNAT made them
/// (`--ctstate DNAT`), and the INPUT chain drops traffic from the bridge to
/// 127.0.0.0/8 that no DNAT of ours answers (with `route_localnet` on, the
/// guest could otherwise reach every loopback service of the host).
pub fn port_forward_rules(
    tag: &str,
    guest_ip: Ipv4Addr,
    bridge: &str,
    forwards: &[PortForward],
) -> Result<Vec<IptablesRule>, RuleError> {
    task_port_rules(
        tag,
        &[ForwardTarget {
            guest_ip,
            bridge,
            forwards,
        }],
    )
}

/// One guest interface's share of a task's port mapping: its address, the
/// bridge it sits behind, and the ports forwarded to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwardTarget<'a> {
    pub guest_ip: Ipv4Addr,
    pub bridge: &'a str,
    pub forwards: &'a [PortForward],
}

/// [`port_forward_rules`] for a task with several bridge interfaces: every
/// target's forwards in the task's one set of chains, so they go in (and
/// out) with one batch (the chains are created once: `-N` refuses a chain
/// that exists). A host address and port may be forwarded once across all
/// targets; each bridge gets its loopback guard once.
pub fn task_port_rules(
    tag: &str,
    targets: &[ForwardTarget<'_>],
) -> Result<Vec<IptablesRule>, RuleError> {
    validate_tag(tag)?;
    let mut seen = BTreeSet::new();
    for target in targets {
        if !is_valid_interface_name(target.bridge) {
            return Err(RuleError::InvalidBridge(target.bridge.to_string()));
        }
        let guest_ip = target.guest_ip;
        if guest_ip.is_unspecified()
            || guest_ip.is_broadcast()
            || guest_ip.is_multicast()
            || guest_ip.is_loopback()
        {
            return Err(RuleError::InvalidGuestIp(guest_ip));
        }
        for forward in target.forwards {
            for (which, port) in [("host", forward.host_port), ("guest", forward.guest_port)] {
                if port == 0 {
                    return Err(RuleError::ZeroPort {
                        label: forward.label.clone(),
                        which,
                    });
                }
            }
            let ip = forward.host_ip;
            if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
                return Err(RuleError::InvalidHostIp {
                    label: forward.label.clone(),
                    host_ip: ip,
                });
            }
            if !seen.insert((ip, forward.host_port)) {
                return Err(RuleError::DuplicateForward {
                    label: forward.label.clone(),
                    host_ip: ip,
                    host_port: forward.host_port,
                });
            }
        }
    }

    if targets.iter().all(|target| target.forwards.is_empty()) {
        return Ok(Vec::new());
    }
    let chain = |shared: &str| task_chain(tag, shared).unwrap_or_default();
    let (prt, out, pst, fw, input) = (
        chain(CHAIN_PRT),
        chain(CHAIN_OUT),
        chain(CHAIN_PST),
        chain(CHAIN_FW),
        chain(CHAIN_IN),
    );
    let comment = ["-m", "comment", "--comment", tag];
    let mut nat_prt = Vec::new();
    let mut nat_out = Vec::new();
    let mut nat_pst = Vec::new();
    let mut filter_fw = Vec::new();
    let mut guards: Vec<IptablesRule> = Vec::new();
    for target in targets.iter().filter(|target| !target.forwards.is_empty()) {
        let (guest_ip, bridge) = (target.guest_ip, target.bridge);
        for forward in target.forwards {
            for proto in ["tcp", "udp"] {
                let host_port = forward.host_port.to_string();
                let guest_port = forward.guest_port.to_string();
                let host_dst = format!("{}/32", forward.host_ip);
                let guest_dst = format!("{guest_ip}/32");
                let to = format!("{guest_ip}:{guest_port}");

                let dnat: Vec<&str> = [
                    "-d", &host_dst, "-p", proto, "-m", proto, "--dport", &host_port,
                ]
                .into_iter()
                .chain(comment)
                .chain(["-j", "DNAT", "--to-destination", &to])
                .collect();
                let to_guest = [
                    "-d",
                    &guest_dst,
                    "-o",
                    bridge,
                    "-p",
                    proto,
                    "-m",
                    proto,
                    "--dport",
                    &guest_port,
                ];

                if forward.host_ip.is_loopback() {
                    nat_out.push(rule(NAT, &out, &dnat));
                    let masquerade: Vec<&str> = ["-s", "127.0.0.0/8"]
                        .into_iter()
                        .chain(to_guest)
                        .chain(comment)
                        .chain(["-j", "MASQUERADE"])
                        .collect();
                    nat_pst.push(rule(NAT, &pst, &masquerade));
                } else {
                    nat_prt.push(rule(NAT, &prt, &dnat));
                    nat_out.push(rule(NAT, &out, &dnat));
                }
                let accept: Vec<&str> = to_guest
                    .into_iter()
                    .chain(["-m", "conntrack", "--ctstate", "DNAT"])
                    .chain(comment)
                    .chain(["-j", "ACCEPT"])
                    .collect();
                filter_fw.push(rule(FILTER, &fw, &accept));
            }
        }
        let guard_args: Vec<&str> = [
            "-d",
            "127.0.0.0/8",
            "-i",
            bridge,
            "-m",
            "conntrack",
            "!",
            "--ctstate",
            "DNAT",
        ]
        .into_iter()
        .chain(comment)
        .chain(["-j", "DROP"])
        .collect();
        let guard = rule(FILTER, &input, &guard_args);
        // Two interfaces on one bridge need one guard.
        if !guards.contains(&guard) {
            guards.push(guard);
        }
    }

    let mut rules = Vec::new();
    rules.extend(nat_prt);
    rules.extend(nat_out);
    rules.extend(nat_pst);
    rules.extend(filter_fw);
    rules.extend(guards);
    for (table, shared, _) in TASK_CHAINS {
        let target = chain(shared);
        let args = task_jump_args(tag, &target);
        rules.push(IptablesRule {
            table: table.to_string(),
            chain: shared.to_string(),
            args,
        });
    }
    Ok(rules)
}

fn rule(table: &str, chain: &str, args: &[&str]) -> IptablesRule {
    IptablesRule {
        table: table.to_string(),
        chain: chain.to_string(),
        args: args.iter().map(|a| a.to_string()).collect(),
    }
}

/// Quotes an argument the way `iptables-restore` splits lines: double quotes
/// group, and inside them `\` escapes the next character.
pub fn quote_arg(arg: &str) -> String {
    let needs_quotes = arg.is_empty()
        || arg
            .chars()
            .any(|c| c.is_whitespace() || c == '"' || c == '\\');
    if !needs_quotes {
        return arg.to_string();
    }
    let mut out = String::with_capacity(arg.len() + 2);
    out.push('"');
    for c in arg.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// The per-task chains `rules` use in `table`, as rule chains or as jump
/// targets, in order of first appearance. An [`BatchOp::Append`] batch
/// creates them; a [`BatchOp::Delete`] batch flushes and deletes them.
pub fn task_chains_used(rules: &[IptablesRule], table: &str) -> Vec<String> {
    let mut chains: Vec<String> = Vec::new();
    for r in rules.iter().filter(|r| r.table == table) {
        let target = r
            .args
            .windows(2)
            .rev()
            .find(|w| w[0] == "-j")
            .map(|w| w[1].as_str());
        for chain in [Some(r.chain.as_str()), target].into_iter().flatten() {
            if is_task_chain(table, chain) && !chains.iter().any(|c| c == chain) {
                chains.push(chain.to_string());
            }
        }
    }
    chains
}

/// The tables `rules` touch, in order of first appearance.
pub fn tables_of(rules: &[IptablesRule]) -> Vec<&str> {
    let mut tables: Vec<&str> = Vec::new();
    for r in rules {
        if !tables.contains(&r.table.as_str()) {
            tables.push(&r.table);
        }
    }
    tables
}

/// One table's section of [`restore_batch`] (without `*table`/`COMMIT`).
pub fn table_lines(rules: &[IptablesRule], table: &str, op: BatchOp) -> Vec<String> {
    let chains = task_chains_used(rules, table);
    let line = |r: &IptablesRule| {
        let mut line = format!("{} {}", op.flag(), r.chain);
        for arg in &r.args {
            line.push(' ');
            line.push_str(&quote_arg(arg));
        }
        line
    };
    let in_table = rules.iter().filter(|r| r.table == table);
    match op {
        BatchOp::Append => chains
            .iter()
            .map(|c| format!("-N {c}"))
            .chain(in_table.map(line))
            .collect(),
        // Jumps out of shared chains go first; a chain of our own goes whole.
        BatchOp::Delete => in_table
            .filter(|r| !chains.contains(&r.chain))
            .map(line)
            .chain(chains.iter().map(|c| format!("-F {c}")))
            .chain(chains.iter().map(|c| format!("-X {c}")))
            .collect(),
    }
}

/// `iptables-restore` input adding or deleting `rules`: one `*table` ...
/// `COMMIT` section per table, tables in order of first appearance. Adding
/// creates the per-task chains first (`-N`: it fails if one exists, so a
/// task's chains are never filled twice); deleting removes the rules in
/// shared chains (the jumps) and then flushes and deletes the per-task
/// chains. Callers passing rules from outside [`port_forward_rules`] check
/// them with [`validate_rule`] first (a newline in an argument would start a
/// new line).
pub fn restore_batch(rules: &[IptablesRule], op: BatchOp) -> String {
    let mut out = String::new();
    for table in tables_of(rules) {
        out.push_str(&table_batch(table, &table_lines(rules, table, op)));
    }
    out
}

/// `iptables-restore` input running `lines` (already complete `-D ...` or
/// `-A ...` lines, e.g. from [`delete_lines_for_tags`]) in `table`; empty
/// when there are no lines.
pub fn table_batch(table: &str, lines: &[String]) -> String {
    if lines.is_empty() {
        return String::new();
    }
    let mut out = format!("*{table}\n");
    for line in lines {
        out.push_str(line);
        out.push('\n');
    }
    out.push_str("COMMIT\n");
    out
}

/// Splits a line into arguments exactly like `iptables-restore` does
/// (`add_param_to_argv` in iptables' xshared.c): whitespace separates, double
/// quotes group, and inside quotes `\` takes the next character literally.
pub fn split_restore_line(line: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut current = String::new();
    let mut started = false;
    let mut quoted = false;
    let mut escaped = false;
    for c in line.chars() {
        if quoted {
            if escaped {
                current.push(c);
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                quoted = false;
            } else {
                current.push(c);
            }
            continue;
        }
        match c {
            '"' => {
                quoted = true;
                started = true;
            }
            ' ' | '\t' | '\n' | '\r' => {
                if started {
                    args.push(std::mem::take(&mut current));
                    started = false;
                }
            }
            _ => {
                current.push(c);
                started = true;
            }
        }
    }
    if started {
        args.push(current);
    }
    args
}

/// One `-A` line of `iptables-save` output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedRule {
    pub table: String,
    pub chain: String,
    /// The `--comment` value, unquoted, if the rule has one.
    pub tag: Option<String>,
    /// The line as printed, starting at `-A`, counters stripped. Reused
    /// verbatim for `-D` so the delete matches what exists exactly.
    pub line: String,
    pub args: Vec<String>,
}

impl SavedRule {
    /// The `-D` line deleting this rule.
    pub fn delete_line(&self) -> String {
        match self.line.strip_prefix("-A ") {
            Some(rest) => format!("-D {rest}"),
            // Only for hand-built values: rebuild the line from its parts.
            None => {
                let args: Vec<String> = self.args.iter().map(|a| quote_arg(a)).collect();
                format!("-D {} {}", self.chain, args.join(" "))
            }
        }
    }
}

/// `args` spelled the way `iptables-save` prints them, for rules written by
/// hand (the Go driver's): a bare IPv4 address after `-s`/`-d` (or their
/// long names) gets its `/32`, and long names become the short ones.
pub fn saved_form(args: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut address_next = false;
    for arg in args {
        let short = match arg.as_str() {
            "--source" => "-s",
            "--destination" => "-d",
            "--in-interface" => "-i",
            "--out-interface" => "-o",
            "--protocol" => "-p",
            "--jump" => "-j",
            "--match" => "-m",
            other => other,
        };
        if address_next && short.parse::<Ipv4Addr>().is_ok() {
            out.push(format!("{short}/32"));
        } else {
            out.push(short.to_string());
        }
        address_next = matches!(short, "-s" | "-d");
    }
    out
}

/// The first saved rule not yet `used` that is `rule` (same table and
/// chain, same arguments once both are in `iptables-save` spelling).
pub fn find_saved(rule: &IptablesRule, saved: &[SavedRule], used: &[bool]) -> Option<usize> {
    let wanted = saved_form(&rule.args);
    saved.iter().enumerate().position(|(i, candidate)| {
        !used.get(i).copied().unwrap_or(true)
            && candidate.table == rule.table
            && candidate.chain == rule.chain
            && (candidate.args == rule.args || candidate.args == wanted)
    })
}

/// The `iptables-restore` line deleting `rule` by its specification.
pub fn delete_line_for(rule: &IptablesRule) -> String {
    let mut line = format!("-D {}", rule.chain);
    for arg in &rule.args {
        line.push(' ');
        line.push_str(&quote_arg(arg));
    }
    line
}

/// Parses every `-A` line of `iptables-save` output (one or many tables).
/// Comments, chain declarations and anything unrecognised are skipped.
pub fn parse_save(save: &str) -> Vec<SavedRule> {
    let mut table = String::new();
    let mut rules = Vec::new();
    for raw in save.lines() {
        let mut line = raw.trim();
        if let Some(name) = line.strip_prefix('*') {
            table = name.trim().to_string();
            continue;
        }
        // `iptables-save -c` prefixes rules with `[packets:bytes] `.
        if line.starts_with('[') {
            if let Some(end) = line.find(']') {
                line = line[end + 1..].trim_start();
            }
        }
        if !line.starts_with("-A ") {
            continue;
        }
        let args = split_restore_line(line);
        let Some(chain) = args.get(1) else { continue };
        let tag = args
            .windows(2)
            .find(|w| w[0] == "--comment")
            .map(|w| w[1].clone());
        rules.push(SavedRule {
            table: table.clone(),
            chain: chain.clone(),
            tag,
            line: line.to_string(),
            args: args[2..].to_vec(),
        });
    }
    rules
}

/// Every tag on rules in `chains` (any table) of `iptables-save` output.
pub fn tags_in_save_output(save: &str, chains: &[&str]) -> BTreeSet<String> {
    parse_save(save)
        .into_iter()
        .filter(|r| chains.contains(&r.chain.as_str()))
        .filter_map(|r| r.tag)
        .collect()
}

/// The rules in the driver's chains of `table` whose tag `keep` rejects.
/// Rules without a comment are never selected.
pub fn rules_to_delete(save: &str, table: &str, keep: impl Fn(&str) -> bool) -> Vec<SavedRule> {
    parse_save(save)
        .into_iter()
        .filter(|r| r.table == table && is_our_chain(table, &r.chain))
        .filter(|r| r.tag.as_deref().is_some_and(|tag| !keep(tag)))
        .collect()
}

/// `-D` lines for [`rules_to_delete`], ready for [`table_batch`].
pub fn delete_lines_for_tags(save: &str, table: &str, keep: impl Fn(&str) -> bool) -> Vec<String> {
    rules_to_delete(save, table, keep)
        .iter()
        .map(SavedRule::delete_line)
        .collect()
}

/// What removing everything tagged as `doomed` accepts from the shared
/// chains of `table` takes, given their rules (`listed`, any table): the
/// `-D` lines for those rules, then `-F` and `-X` for every per-task chain
/// one of them jumps to. Returns the lines and the removed rules. Untagged
/// rules are never selected.
pub fn removal_lines(
    listed: &[SavedRule],
    table: &str,
    doomed: impl Fn(&str) -> bool,
) -> (Vec<String>, Vec<SavedRule>) {
    let gone: Vec<SavedRule> = listed
        .iter()
        .filter(|r| r.table == table && is_our_chain(table, &r.chain))
        .filter(|r| r.tag.as_deref().is_some_and(&doomed))
        .cloned()
        .collect();
    let mut lines: Vec<String> = gone.iter().map(SavedRule::delete_line).collect();
    let mut chains: Vec<&str> = Vec::new();
    for rule in &gone {
        if let [.., jump, target] = rule.args.as_slice() {
            if jump == "-j" && is_task_chain(table, target) && !chains.contains(&target.as_str()) {
                chains.push(target);
            }
        }
    }
    lines.extend(chains.iter().map(|c| format!("-F {c}")));
    lines.extend(chains.iter().map(|c| format!("-X {c}")));
    (lines, gone)
}

/// Whether `iptables-save` output of one table declares `chain`.
pub fn chain_declared(save: &str, chain: &str) -> bool {
    save.lines().any(|line| {
        line.strip_prefix(':')
            .and_then(|rest| rest.split_whitespace().next())
            == Some(chain)
    })
}

/// How many plain `-A <parent> -j <chain>` jumps `iptables-save` output of
/// one table holds.
pub fn jump_count(save: &str, parent: &str, chain: &str) -> usize {
    parse_save(save)
        .iter()
        .filter(|r| r.chain == parent && r.args == ["-j", chain])
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TAG: &str = "nomad-driver-virt:alloc1/web/abcd1234";
    const GUEST: Ipv4Addr = Ipv4Addr::new(192, 168, 122, 10);

    fn fwd(host_ip: [u8; 4], host_port: u16, guest_port: u16) -> PortForward {
        PortForward {
            label: "http".into(),
            host_ip: Ipv4Addr::from(host_ip),
            host_port,
            guest_port,
        }
    }

    /// Several bridge interfaces: one set of chains and jumps, each
    /// interface's ports to its own address behind its own bridge, one
    /// guard per bridge, a host port forwarded once across them all.
    #[test]
    fn several_targets_share_the_task_chains() {
        let first = [fwd([10, 0, 0, 5], 8080, 80)];
        let mut second = fwd([127, 0, 0, 1], 9090, 9000);
        second.label = "admin".into();
        let second = [second];
        let other_guest = Ipv4Addr::new(10, 9, 0, 7);
        fn target<'a>(
            guest_ip: Ipv4Addr,
            bridge: &'a str,
            forwards: &'a [PortForward],
        ) -> ForwardTarget<'a> {
            ForwardTarget {
                guest_ip,
                bridge,
                forwards,
            }
        }
        // One target is exactly port_forward_rules.
        assert_eq!(
            task_port_rules(TAG, &[target(GUEST, "virbr0", &first)]).unwrap(),
            port_forward_rules(TAG, GUEST, "virbr0", &first).unwrap()
        );
        let rules = task_port_rules(
            TAG,
            &[
                target(GUEST, "virbr0", &first),
                target(other_guest, "ndvtestbr1", &[]),
                target(other_guest, "ndvtestbr1", &second),
            ],
        )
        .unwrap();
        let batch = restore_batch(&rules, BatchOp::Append);
        for chain in TASK_CHAINS
            .iter()
            .map(|(_, shared, _)| task_chain(TAG, shared).unwrap())
        {
            assert_eq!(
                batch.matches(&format!("-N {chain}\n")).count(),
                1,
                "{batch}"
            );
        }
        let jumps = rules
            .iter()
            .filter(|r| TASK_CHAINS.iter().any(|(_, shared, _)| r.chain == *shared))
            .count();
        assert_eq!(jumps, TASK_CHAINS.len());
        let text = lines(&rules).join("\n");
        assert!(
            text.contains("--to-destination 192.168.122.10:80"),
            "{text}"
        );
        assert!(text.contains("--to-destination 10.9.0.7:9000"), "{text}");
        assert!(text.contains("-d 10.9.0.7/32 -o ndvtestbr1"), "{text}");
        let guards: Vec<&String> = rules
            .iter()
            .filter(|r| r.args.iter().any(|a| a == "DROP"))
            .map(|r| &r.args[3])
            .collect();
        assert_eq!(guards, vec!["virbr0", "ndvtestbr1"]);
        // Two interfaces on one bridge: one guard.
        let same = task_port_rules(
            TAG,
            &[
                target(GUEST, "virbr0", &first),
                target(other_guest, "virbr0", &second),
            ],
        )
        .unwrap();
        assert_eq!(
            same.iter()
                .filter(|r| r.args.iter().any(|a| a == "DROP"))
                .count(),
            1
        );
        // A host address and port goes to one interface only.
        assert!(matches!(
            task_port_rules(
                TAG,
                &[
                    target(GUEST, "virbr0", &first),
                    target(other_guest, "virbr0", &first)
                ],
            ),
            Err(RuleError::DuplicateForward { .. })
        ));
        // Nothing to forward anywhere: no rules, no chains.
        assert!(task_port_rules(
            TAG,
            &[
                target(GUEST, "virbr0", &[]),
                target(other_guest, "virbr0", &[])
            ]
        )
        .unwrap()
        .is_empty());
        // A bad second target is refused like a bad first one.
        assert!(matches!(
            task_port_rules(
                TAG,
                &[
                    target(GUEST, "virbr0", &first),
                    target(Ipv4Addr::LOCALHOST, "virbr0", &second)
                ],
            ),
            Err(RuleError::InvalidGuestIp(_))
        ));
    }

    fn lines(rules: &[IptablesRule]) -> Vec<String> {
        rules
            .iter()
            .map(|r| format!("{} {} {}", r.table, r.chain, r.args.join(" ")))
            .collect()
    }

    fn go_rule(table: &str, chain: &str, args: &str) -> IptablesRule {
        IptablesRule {
            table: table.into(),
            chain: chain.into(),
            args: args.split(' ').map(String::from).collect(),
        }
    }

    #[test]
    fn go_rules_are_matched_in_saved_spelling() {
        let save = "*nat\n:NOMAD_VT_PRT - [0:0]\n\
            -A NOMAD_VT_PRT -d 10.0.0.5/32 -i eth0 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 192.168.122.10:80\n\
            -A NOMAD_VT_PRT -d 10.0.0.5/32 -i eth0 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 192.168.122.10:80\n\
            COMMIT\n*filter\n\
            -A NOMAD_VT_FW -d 192.168.122.10/32 -p tcp -m state --state NEW -m tcp --dport 80 -j ACCEPT\n\
            COMMIT\n";
        let saved = parse_save(save);
        let dnat = go_rule(
            NAT,
            CHAIN_PRT,
            "-d 10.0.0.5 -i eth0 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 192.168.122.10:80",
        );
        let accept = go_rule(
            FILTER,
            CHAIN_FW,
            "-d 192.168.122.10 -p tcp -m state --state NEW -m tcp --dport 80 -j ACCEPT",
        );
        let mut used = vec![false; saved.len()];
        let first = find_saved(&dnat, &saved, &used).unwrap();
        used[first] = true;
        // A second listing takes the duplicate, a third finds none.
        let second = find_saved(&dnat, &saved, &used).unwrap();
        assert_ne!(first, second);
        used[second] = true;
        assert_eq!(find_saved(&dnat, &saved, &used), None);
        assert_eq!(
            saved[find_saved(&accept, &saved, &used).unwrap()].chain,
            CHAIN_FW
        );
        // Another port, chain or table is another rule.
        let other_port = go_rule(NAT, CHAIN_PRT, "-d 10.0.0.5 -i eth0 -p tcp -m tcp --dport 8081 -j DNAT --to-destination 192.168.122.10:80");
        assert_eq!(find_saved(&other_port, &saved, &[false; 3]), None);
        let other_chain = IptablesRule {
            chain: CHAIN_OUT.into(),
            ..dnat
        };
        assert_eq!(find_saved(&other_chain, &saved, &[false; 3]), None);
        assert_eq!(
            saved_form(&[
                "--source".into(),
                "127.0.0.1".into(),
                "-d".into(),
                "10.0.0.0/8".into()
            ]),
            ["-s", "127.0.0.1/32", "-d", "10.0.0.0/8"]
        );
        assert_eq!(
            delete_line_for(&go_rule(NAT, CHAIN_OUT, "-s 127.0.0.1 -j DNAT")),
            "-D NOMAD_VT_OUT -s 127.0.0.1 -j DNAT"
        );
    }

    #[test]
    fn base_chains_and_parents() {
        assert_eq!(
            base_chains(),
            vec![
                ("nat", "NOMAD_VT_PRT", "PREROUTING"),
                ("nat", "NOMAD_VT_OUT", "OUTPUT"),
                ("nat", "NOMAD_VT_PST", "POSTROUTING"),
                ("filter", "NOMAD_VT_FW", "FORWARD"),
                ("filter", "NOMAD_VT_IN", "INPUT"),
            ]
        );
        assert_eq!(our_tables(), vec!["nat", "filter"]);
        assert!(is_our_chain("filter", CHAIN_FW));
        assert!(!is_our_chain("nat", CHAIN_FW));
        assert!(!is_our_chain("filter", "FORWARD"));
        assert_eq!(parent_jump_args(CHAIN_FW), ["-j", "NOMAD_VT_FW"]);
        assert_eq!(
            parent_jump_args(CHAIN_IN),
            ["-d", "127.0.0.0/8", "!", "-i", "lo", "-j", "NOMAD_VT_IN"]
        );
    }

    #[test]
    fn task_chain_names_are_stable_short_and_recognised() {
        // FNV-1a of the tag: stable across releases, since a later plugin
        // removes chains an earlier one made.
        assert_eq!(
            task_chain(TAG, CHAIN_PRT).unwrap(),
            "NOMAD_VT_bb19ff15fd1b896b_P"
        );
        for (table, shared, suffix) in TASK_CHAINS {
            let name = task_chain(TAG, shared).unwrap();
            assert!(name.len() <= 28, "{name}");
            assert!(name.ends_with(suffix), "{name}");
            assert!(is_task_chain(table, &name), "{name}");
            assert!(!is_our_chain(table, &name));
            let other = if table == NAT { FILTER } else { NAT };
            assert!(!is_task_chain(other, &name), "{name}");
        }
        assert_ne!(
            task_chain(TAG, CHAIN_FW),
            task_chain("nomad-driver-virt:other", CHAIN_FW)
        );
        assert_eq!(task_chain(TAG, "FORWARD"), None);
        for bad in [
            "NOMAD_VT_PRT",
            "NOMAD_VT_bb19ff15fd1b896b_X",
            "NOMAD_VT_bb19ff15fd1b896B_P",
            "NOMAD_VT_bb19ff15fd1b89_P",
            "NOMAD_VT_bb19ff15fd1b896b_PP",
            "LIBVIRT_bb19ff15fd1b896b_P",
        ] {
            assert!(!is_task_chain(NAT, bad), "{bad}");
        }
    }

    /// The exact rules for one host-address and one loopback forward.
    #[test]
    fn forwards_make_per_task_chains_and_one_jump_each() {
        let rules = port_forward_rules(
            TAG,
            GUEST,
            "virbr0",
            &[fwd([10, 0, 0, 5], 8080, 80), fwd([127, 0, 0, 1], 2222, 22)],
        )
        .unwrap();
        let c = "-m comment --comment nomad-driver-virt:alloc1/web/abcd1234";
        let h = "NOMAD_VT_bb19ff15fd1b896b";
        let dnat = |p: &str| {
            format!("-d 10.0.0.5/32 -p {p} -m {p} --dport 8080 {c} -j DNAT --to-destination 192.168.122.10:80")
        };
        let dnat_lo = |p: &str| {
            format!("-d 127.0.0.1/32 -p {p} -m {p} --dport 2222 {c} -j DNAT --to-destination 192.168.122.10:22")
        };
        let accept = |p: &str, port: u16| {
            format!("-d 192.168.122.10/32 -o virbr0 -p {p} -m {p} --dport {port} -m conntrack --ctstate DNAT {c} -j ACCEPT")
        };
        let expected = vec![
            format!("nat {h}_P {}", dnat("tcp")),
            format!("nat {h}_P {}", dnat("udp")),
            format!("nat {h}_O {}", dnat("tcp")),
            format!("nat {h}_O {}", dnat_lo("tcp")),
            format!("nat {h}_O {}", dnat("udp")),
            format!("nat {h}_O {}", dnat_lo("udp")),
            format!("nat {h}_S -s 127.0.0.0/8 -d 192.168.122.10/32 -o virbr0 -p tcp -m tcp --dport 22 {c} -j MASQUERADE"),
            format!("nat {h}_S -s 127.0.0.0/8 -d 192.168.122.10/32 -o virbr0 -p udp -m udp --dport 22 {c} -j MASQUERADE"),
            format!("filter {h}_F {}", accept("tcp", 80)),
            format!("filter {h}_F {}", accept("tcp", 22)),
            format!("filter {h}_F {}", accept("udp", 80)),
            format!("filter {h}_F {}", accept("udp", 22)),
            format!("filter {h}_I -d 127.0.0.0/8 -i virbr0 -m conntrack ! --ctstate DNAT {c} -j DROP"),
            format!("nat NOMAD_VT_PRT {c} -j {h}_P"),
            format!("nat NOMAD_VT_OUT {c} -j {h}_O"),
            format!("nat NOMAD_VT_PST {c} -j {h}_S"),
            format!("filter NOMAD_VT_FW {c} -j {h}_F"),
            format!("filter NOMAD_VT_IN {c} -j {h}_I"),
        ];
        // The FW rules come out per forward and protocol; compare as sets
        // where the order inside a chain does not matter.
        let mut got = lines(&rules);
        let mut want = expected;
        got.sort();
        want.sort();
        assert_eq!(got, want);
        for rule in &rules {
            validate_rule(rule).unwrap();
        }
    }

    #[test]
    fn other_loopback_addresses_are_loopback() {
        let rules =
            port_forward_rules(TAG, GUEST, "br0", &[fwd([127, 1, 2, 3], 1000, 1000)]).unwrap();
        let prt = task_chain(TAG, CHAIN_PRT).unwrap();
        let pst = task_chain(TAG, CHAIN_PST).unwrap();
        assert!(rules.iter().all(|r| r.chain != prt));
        assert_eq!(rules.iter().filter(|r| r.chain == pst).count(), 2);
    }

    #[test]
    fn no_forwards_no_rules() {
        assert!(port_forward_rules(TAG, GUEST, "virbr0", &[])
            .unwrap()
            .is_empty());
        let rules = port_forward_rules(TAG, GUEST, "virbr0", &[fwd([10, 0, 0, 5], 1, 2)]).unwrap();
        // 2 x (PRT, OUT, FW) + the guard + 5 jumps.
        assert_eq!(rules.len(), 12);
    }

    #[test]
    fn batch_text_is_exact() {
        let rules =
            port_forward_rules(TAG, GUEST, "virbr0", &[fwd([127, 0, 0, 1], 8080, 80)]).unwrap();
        let c = "-m comment --comment nomad-driver-virt:alloc1/web/abcd1234";
        let h = "NOMAD_VT_bb19ff15fd1b896b";
        let add = restore_batch(&rules, BatchOp::Append);
        let expected = format!(
            "*nat\n\
             -N {h}_O\n\
             -N {h}_S\n\
             -N {h}_P\n\
             -A {h}_O -d 127.0.0.1/32 -p tcp -m tcp --dport 8080 {c} -j DNAT --to-destination 192.168.122.10:80\n\
             -A {h}_O -d 127.0.0.1/32 -p udp -m udp --dport 8080 {c} -j DNAT --to-destination 192.168.122.10:80\n\
             -A {h}_S -s 127.0.0.0/8 -d 192.168.122.10/32 -o virbr0 -p tcp -m tcp --dport 80 {c} -j MASQUERADE\n\
             -A {h}_S -s 127.0.0.0/8 -d 192.168.122.10/32 -o virbr0 -p udp -m udp --dport 80 {c} -j MASQUERADE\n\
             -A NOMAD_VT_PRT {c} -j {h}_P\n\
             -A NOMAD_VT_OUT {c} -j {h}_O\n\
             -A NOMAD_VT_PST {c} -j {h}_S\n\
             COMMIT\n\
             *filter\n\
             -N {h}_F\n\
             -N {h}_I\n\
             -A {h}_F -d 192.168.122.10/32 -o virbr0 -p tcp -m tcp --dport 80 -m conntrack --ctstate DNAT {c} -j ACCEPT\n\
             -A {h}_F -d 192.168.122.10/32 -o virbr0 -p udp -m udp --dport 80 -m conntrack --ctstate DNAT {c} -j ACCEPT\n\
             -A {h}_I -d 127.0.0.0/8 -i virbr0 -m conntrack ! --ctstate DNAT {c} -j DROP\n\
             -A NOMAD_VT_FW {c} -j {h}_F\n\
             -A NOMAD_VT_IN {c} -j {h}_I\n\
             COMMIT\n"
        );
        assert_eq!(add, expected);
        // Deleting the same rules and removing by tag alone agree, up to
        // the order of the jumps.
        let delete = restore_batch(&rules, BatchOp::Delete);
        let by_tag = task_removal_batch(TAG);
        let sorted = |text: &str| {
            let mut lines: Vec<&str> = text.lines().collect();
            lines.sort();
            lines.join("\n")
        };
        assert_eq!(sorted(&delete), sorted(&by_tag));
        assert_eq!(
            by_tag,
            format!(
                "*nat\n\
                 -D NOMAD_VT_PRT {c} -j {h}_P\n\
                 -D NOMAD_VT_OUT {c} -j {h}_O\n\
                 -D NOMAD_VT_PST {c} -j {h}_S\n\
                 -F {h}_P\n-F {h}_O\n-F {h}_S\n\
                 -X {h}_P\n-X {h}_O\n-X {h}_S\n\
                 COMMIT\n\
                 *filter\n\
                 -D NOMAD_VT_FW {c} -j {h}_F\n\
                 -D NOMAD_VT_IN {c} -j {h}_I\n\
                 -F {h}_F\n-F {h}_I\n\
                 -X {h}_F\n-X {h}_I\n\
                 COMMIT\n"
            )
        );
        assert_eq!(restore_batch(&[], BatchOp::Append), "");
        // Plain rules in a shared chain stay plain (no chains to create).
        let plain = rule(NAT, CHAIN_PRT, &["-j", "RETURN"]);
        assert_eq!(
            restore_batch(std::slice::from_ref(&plain), BatchOp::Delete),
            "*nat\n-D NOMAD_VT_PRT -j RETURN\nCOMMIT\n"
        );
    }

    #[test]
    fn removal_lines_cover_both_layouts() {
        let h = "NOMAD_VT_bb19ff15fd1b896b";
        let listing = format!(
            "*nat\n\
             -A NOMAD_VT_PRT -m comment --comment \"{TAG}\" -j {h}_P\n\
             -A NOMAD_VT_PRT -m comment --comment nomad-driver-virt:other -j NOMAD_VT_0000000000000000_P\n\
             -A NOMAD_VT_PRT -d 10.0.0.5/32 -p tcp -m tcp --dport 1 -m comment --comment \"{TAG}\" -j DNAT --to-destination 192.168.122.10:1\n\
             -A NOMAD_VT_PRT -m comment --comment \"{TAG}\" -j RETURN\n\
             -A NOMAD_VT_PRT -j {h}_O\n\
             -A PREROUTING -m comment --comment \"{TAG}\" -j RETURN\n"
        );
        let listed = parse_save(&listing);
        let (lines, gone) = removal_lines(&listed, NAT, |t| t == TAG);
        assert_eq!(gone.len(), 3);
        assert_eq!(
            lines,
            vec![
                format!("-D NOMAD_VT_PRT -m comment --comment \"{TAG}\" -j {h}_P"),
                format!("-D NOMAD_VT_PRT -d 10.0.0.5/32 -p tcp -m tcp --dport 1 -m comment --comment \"{TAG}\" -j DNAT --to-destination 192.168.122.10:1"),
                format!("-D NOMAD_VT_PRT -m comment --comment \"{TAG}\" -j RETURN"),
                format!("-F {h}_P"),
                format!("-X {h}_P"),
            ]
        );
        let (lines, gone) = removal_lines(&listed, FILTER, |_| true);
        assert!(lines.is_empty() && gone.is_empty());
    }

    #[test]
    fn quoting_round_trips_through_the_restore_splitter() {
        assert_eq!(quote_arg("plain"), "plain");
        assert_eq!(quote_arg("a b"), "\"a b\"");
        assert_eq!(quote_arg("say \"hi\""), "\"say \\\"hi\\\"\"");
        assert_eq!(quote_arg("back\\slash"), "\"back\\\\slash\"");
        assert_eq!(quote_arg(""), "\"\"");
        let rule = IptablesRule {
            table: "nat".into(),
            chain: CHAIN_PRT.into(),
            args: vec![
                "-m".into(),
                "comment".into(),
                "--comment".into(),
                "a \"quoted\" \\ comment".into(),
                "-j".into(),
                "RETURN".into(),
            ],
        };
        let batch = restore_batch(std::slice::from_ref(&rule), BatchOp::Append);
        assert_eq!(
            batch,
            "*nat\n-A NOMAD_VT_PRT -m comment --comment \"a \\\"quoted\\\" \\\\ comment\" -j RETURN\nCOMMIT\n"
        );
        let line = batch.lines().nth(1).unwrap();
        let split = split_restore_line(line);
        assert_eq!(&split[2..], rule.args.as_slice());
    }

    #[test]
    fn hostile_tags_are_rejected() {
        let f = [fwd([10, 0, 0, 5], 80, 80)];
        for tag in [
            "",
            "a b",
            "x\" -j ACCEPT \"",
            "tag\n-A FORWARD -j ACCEPT",
            "-j",
            "tag;rm",
            "t\u{e9}",
            "tag\\",
        ] {
            assert!(
                port_forward_rules(tag, GUEST, "virbr0", &f).is_err(),
                "{tag:?} accepted"
            );
        }
        let long = "a".repeat(201);
        assert_eq!(
            port_forward_rules(&long, GUEST, "virbr0", &f),
            Err(RuleError::TagTooLong { len: 201 })
        );
        assert!(port_forward_rules(&"a".repeat(200), GUEST, "virbr0", &f).is_ok());
        let err = port_forward_rules("a b", GUEST, "virbr0", &f).unwrap_err();
        assert!(err.to_string().contains("' '"), "{err}");
    }

    #[test]
    fn hostile_bridges_are_rejected() {
        let f = [fwd([10, 0, 0, 5], 80, 80)];
        for bridge in [
            "",
            ".",
            "..",
            "virbr0 -j ACCEPT",
            "a/b",
            "sixteen-chars-xx",
            "br\n0",
            "br\"0",
        ] {
            assert_eq!(
                port_forward_rules(TAG, GUEST, bridge, &f),
                Err(RuleError::InvalidBridge(bridge.into())),
                "{bridge:?}"
            );
        }
        assert!(port_forward_rules(TAG, GUEST, "fifteen-chars-x", &f).is_ok());
    }

    #[test]
    fn bad_ports_and_addresses_are_rejected() {
        let err = port_forward_rules(TAG, GUEST, "virbr0", &[fwd([10, 0, 0, 5], 0, 80)]);
        assert_eq!(
            err,
            Err(RuleError::ZeroPort {
                label: "http".into(),
                which: "host"
            })
        );
        let err = port_forward_rules(TAG, GUEST, "virbr0", &[fwd([10, 0, 0, 5], 80, 0)]);
        assert!(matches!(
            err,
            Err(RuleError::ZeroPort { which: "guest", .. })
        ));
        for host in [[0, 0, 0, 0], [255, 255, 255, 255], [224, 0, 0, 1]] {
            assert!(matches!(
                port_forward_rules(TAG, GUEST, "virbr0", &[fwd(host, 80, 80)]),
                Err(RuleError::InvalidHostIp { .. })
            ));
        }
        for guest in [
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            Ipv4Addr::LOCALHOST,
        ] {
            assert_eq!(
                port_forward_rules(TAG, guest, "virbr0", &[fwd([10, 0, 0, 5], 80, 80)]),
                Err(RuleError::InvalidGuestIp(guest))
            );
        }
        let dup = [fwd([10, 0, 0, 5], 80, 80), fwd([10, 0, 0, 5], 80, 81)];
        assert!(matches!(
            port_forward_rules(TAG, GUEST, "virbr0", &dup),
            Err(RuleError::DuplicateForward { .. })
        ));
    }

    #[test]
    fn task_tags_are_sanitised_and_bounded() {
        assert_eq!(
            task_tag("9f8e-11/web server/ab12"),
            "nomad-driver-virt:9f8e-11/web_server/ab12"
        );
        assert_eq!(task_tag("a\"b\nc;d\u{e9}"), "nomad-driver-virt:a_b_c_d_");
        validate_tag(&task_tag("x y\"z")).unwrap();
        let long_a = task_tag(&"a".repeat(500));
        let long_b = task_tag(&format!("{}b", "a".repeat(499)));
        assert_eq!(long_a.len(), MAX_TAG_LEN);
        assert_ne!(long_a, long_b);
        validate_tag(&long_a).unwrap();
        assert!(long_a.starts_with(TAG_PREFIX));
        // Stable across calls (and releases: FNV, not a seeded hasher).
        assert_eq!(long_a, task_tag(&"a".repeat(500)));
    }

    #[test]
    fn validate_rule_rejects_foreign_chains_and_control_characters() {
        let mut r = rule(NAT, CHAIN_PRT, &["-j", "RETURN"]);
        validate_rule(&r).unwrap();
        r.args.push("x\ny".into());
        assert!(matches!(
            validate_rule(&r),
            Err(RuleError::BadArgument { .. })
        ));
        r.args.pop();
        r.args.push(String::new());
        assert!(validate_rule(&r).is_err());
        for (t, c) in [
            ("filter", "FORWARD"),
            ("nat", "NOMAD_VT_FW"),
            ("mangle", CHAIN_PRT),
        ] {
            assert!(matches!(
                validate_rule(&rule(t, c, &["-j", "RETURN"])),
                Err(RuleError::ForeignChain { .. })
            ));
        }
    }

    /// Output in the shape of `iptables-save` 1.8.9 (nf_tables) on a libvirt
    /// host, plus an unquoted comment as the legacy backend prints it.
    const SAVE: &str = r#"# Generated by iptables-save v1.8.9 (nf_tables) on Fri Nov 27 19:37:14 2026
*nat
:PREROUTING ACCEPT [12:3456]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [7:420]
:POSTROUTING ACCEPT [7:420]
:LIBVIRT_PRT - [0:0]
:NOMAD_VT_OUT - [0:0]
:NOMAD_VT_PRT - [0:0]
:NOMAD_VT_PST - [0:0]
-A PREROUTING -j NOMAD_VT_PRT
-A OUTPUT -j NOMAD_VT_OUT
-A POSTROUTING -j NOMAD_VT_PST
-A POSTROUTING -j LIBVIRT_PRT
-A LIBVIRT_PRT -s 192.168.122.0/24 -d 224.0.0.0/24 -j RETURN
-A LIBVIRT_PRT -s 192.168.122.0/24 ! -d 192.168.122.0/24 -p tcp -j MASQUERADE --to-ports 1024-65535
-A LIBVIRT_PRT -m comment --comment "nomad-driver-virt:not-in-our-chain" -j RETURN
-A NOMAD_VT_PRT -d 10.0.0.5/32 -p tcp -m tcp --dport 8080 -m comment --comment "nomad-driver-virt:alloc1/web/abcd1234" -j DNAT --to-destination 192.168.122.10:80
-A NOMAD_VT_PRT -d 10.0.0.5/32 -p udp -m udp --dport 8080 -m comment --comment nomad-driver-virt:alloc2/db/00000000 -j DNAT --to-destination 192.168.122.11:5432
-A NOMAD_VT_PRT -d 10.0.0.5/32 -p tcp -m tcp --dport 9 -j DNAT --to-destination 192.168.122.12:9
-A NOMAD_VT_OUT -d 10.0.0.5/32 -p tcp -m tcp --dport 8080 -m comment --comment "nomad-driver-virt:alloc1/web/abcd1234" -j DNAT --to-destination 192.168.122.10:80
-A NOMAD_VT_PST -s 127.0.0.0/8 -d 192.168.122.11/32 -o virbr0 -p tcp -m tcp --dport 5432 -m comment --comment "hand made \"rule\"" -j MASQUERADE
COMMIT
# Completed on Fri Nov 27 19:37:14 2026
# Generated by iptables-save v1.8.9 (nf_tables) on Fri Nov 27 19:37:14 2026
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:LIBVIRT_FWI - [0:0]
:NOMAD_VT_FW - [0:0]
-A FORWARD -j NOMAD_VT_FW
-A FORWARD -j LIBVIRT_FWI
-A FORWARD -j NOMAD_VT_FW
-A LIBVIRT_FWI -d 192.168.122.0/24 -o virbr0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A LIBVIRT_FWI -o virbr0 -j REJECT --reject-with icmp-port-unreachable
-A NOMAD_VT_FW -d 192.168.122.10/32 -o virbr0 -p tcp -m tcp --dport 80 -m comment --comment "nomad-driver-virt:alloc1/web/abcd1234" -j ACCEPT
-A NOMAD_VT_FW -d 192.168.122.11/32 -o virbr0 -p tcp -m tcp --dport 5432 -m comment --comment "nomad-driver-virt:alloc2/db/00000000" -j ACCEPT
COMMIT
# Completed on Fri Nov 27 19:37:14 2026
"#;

    #[test]
    fn save_output_tags_only_from_the_given_chains() {
        let ours = [CHAIN_PRT, CHAIN_OUT, CHAIN_PST, CHAIN_FW];
        let tags = tags_in_save_output(SAVE, &ours);
        assert_eq!(
            tags.into_iter().collect::<Vec<_>>(),
            vec![
                "hand made \"rule\"",
                "nomad-driver-virt:alloc1/web/abcd1234",
                "nomad-driver-virt:alloc2/db/00000000",
            ]
        );
        let fw_only = tags_in_save_output(SAVE, &[CHAIN_FW]);
        assert_eq!(fw_only.len(), 2);
        assert!(tags_in_save_output(SAVE, &["LIBVIRT_PRT"])
            .contains("nomad-driver-virt:not-in-our-chain"));
        assert!(tags_in_save_output("", &ours).is_empty());
    }

    #[test]
    fn delete_lines_select_by_tag_within_our_chains_of_one_table() {
        let nat =
            delete_lines_for_tags(SAVE, NAT, |t| t != "nomad-driver-virt:alloc1/web/abcd1234");
        assert_eq!(
            nat,
            vec![
                "-D NOMAD_VT_PRT -d 10.0.0.5/32 -p tcp -m tcp --dport 8080 -m comment --comment \"nomad-driver-virt:alloc1/web/abcd1234\" -j DNAT --to-destination 192.168.122.10:80",
                "-D NOMAD_VT_OUT -d 10.0.0.5/32 -p tcp -m tcp --dport 8080 -m comment --comment \"nomad-driver-virt:alloc1/web/abcd1234\" -j DNAT --to-destination 192.168.122.10:80",
            ]
        );
        let filter = delete_lines_for_tags(SAVE, FILTER, |t| {
            t != "nomad-driver-virt:alloc1/web/abcd1234"
        });
        assert_eq!(
            filter,
            vec!["-D NOMAD_VT_FW -d 192.168.122.10/32 -o virbr0 -p tcp -m tcp --dport 80 -m comment --comment \"nomad-driver-virt:alloc1/web/abcd1234\" -j ACCEPT"]
        );
        // Reconciliation: our prefix, not kept. The foreign-tagged rule, the
        // untagged rule and the tagged rule in LIBVIRT_PRT stay.
        let keep = |t: &str| !t.starts_with(TAG_PREFIX) || t.ends_with("alloc1/web/abcd1234");
        let orphans = rules_to_delete(SAVE, NAT, keep);
        assert_eq!(orphans.len(), 1);
        assert_eq!(orphans[0].chain, CHAIN_PRT);
        assert_eq!(
            orphans[0].tag.as_deref(),
            Some("nomad-driver-virt:alloc2/db/00000000")
        );
        assert!(delete_lines_for_tags(SAVE, NAT, |_| true).is_empty());
        assert!(delete_lines_for_tags(SAVE, "mangle", |_| false).is_empty());
        // Everything tagged in our nat chains, including the hand-made tag.
        assert_eq!(delete_lines_for_tags(SAVE, NAT, |_| false).len(), 4);
    }

    #[test]
    fn delete_batch_text() {
        let lines = delete_lines_for_tags(SAVE, FILTER, |_| false);
        let batch = table_batch(FILTER, &lines);
        assert!(batch.starts_with("*filter\n-D NOMAD_VT_FW -d 192.168.122.10/32"));
        assert!(batch.ends_with("-j ACCEPT\nCOMMIT\n"));
        assert_eq!(batch.lines().count(), 4);
        assert_eq!(table_batch(FILTER, &[]), "");
    }

    #[test]
    fn parse_save_handles_counters_and_quotes() {
        let save = "*nat\n[3:180] -A NOMAD_VT_OUT -m comment --comment \"a b\" -j RETURN\n";
        let rules = parse_save(save);
        assert_eq!(rules.len(), 1);
        assert_eq!(rules[0].table, "nat");
        assert_eq!(rules[0].tag.as_deref(), Some("a b"));
        assert_eq!(
            rules[0].delete_line(),
            "-D NOMAD_VT_OUT -m comment --comment \"a b\" -j RETURN"
        );
        assert_eq!(
            rules[0].args,
            ["-m", "comment", "--comment", "a b", "-j", "RETURN"]
        );
    }

    #[test]
    fn chain_and_jump_detection() {
        assert!(chain_declared(SAVE, CHAIN_PST));
        assert!(chain_declared(SAVE, "LIBVIRT_FWI"));
        assert!(!chain_declared(SAVE, "NOMAD_VT"));
        assert_eq!(jump_count(SAVE, "PREROUTING", CHAIN_PRT), 1);
        assert_eq!(jump_count(SAVE, "FORWARD", CHAIN_FW), 2);
        assert_eq!(jump_count(SAVE, "OUTPUT", CHAIN_PRT), 0);
    }

    proptest::proptest! {
        #[test]
        fn quote_then_split_is_identity(args in proptest::collection::vec("[^\\p{Cc}]{0,12}", 1..6)) {
            let line: Vec<String> = args.iter().map(|a| quote_arg(a)).collect();
            proptest::prop_assert_eq!(split_restore_line(&line.join(" ")), args);
        }

        #[test]
        fn task_tags_always_validate(id in "\\PC{0,300}") {
            let tag = task_tag(&id);
            proptest::prop_assert!(validate_tag(&tag).is_ok(), "{:?}", tag);
            proptest::prop_assert!(tag.starts_with(TAG_PREFIX));
        }
    }

    #[test]
    fn splitter_matches_iptables_restore() {
        assert_eq!(split_restore_line("  -A  X\t-j Y "), ["-A", "X", "-j", "Y"]);
        assert_eq!(split_restore_line("a\"b c\"d"), ["ab cd"]);
        assert_eq!(split_restore_line("x \"\" y"), ["x", "", "y"]);
        // Outside quotes a backslash is an ordinary character.
        assert_eq!(split_restore_line("a\\b"), ["a\\b"]);
    }
}

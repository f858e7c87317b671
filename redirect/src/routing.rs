//! Policy routing that delivers marked packets locally.
//!
//! Why: a TPROXY'd packet still carries the service address as destination,
//! which is not local to the node. `fwmark <mark> lookup <table>` plus a
//! `local` default route in that table make the kernel deliver it to the
//! transparent listener (without the rule, clients get ENETUNREACH). The same
//! route carries locally originated packets, marked in `output`, through `lo`
//! back into `prerouting`. Setup is idempotent (it first removes copies left
//! by a crashed run), so start-up reconciles.

use crate::exec::run;
use crate::Error;

/// At most this many stale copies of our rule are removed (a guard against
/// looping on a misbehaving `ip`).
const MAX_STALE_RULES: usize = 64;

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    fn flag(self) -> &'static str {
        match self {
            IpFamily::V4 => "-4",
            IpFamily::V6 => "-6",
        }
    }
    fn default_prefix(self) -> &'static str {
        match self {
            IpFamily::V4 => "0.0.0.0/0",
            IpFamily::V6 => "::/0",
        }
    }
}

/// The `ip rule` selector, as `ip rule show` prints it.
fn selector(mark: u32) -> String {
    format!("fwmark {mark:#x}/{mark:#x}")
}

/// How many copies of our rule are installed, parsed from `ip rule show`.
pub fn count_rules(show_output: &str, mark: u32, table: u32) -> usize {
    let sel = selector(mark);
    let lookup = format!("lookup {table}");
    show_output
        .lines()
        .filter(|l| {
            l.contains(&sel)
                && l.split_whitespace()
                    .collect::<Vec<_>>()
                    .windows(2)
                    .any(|w| w.join(" ") == lookup)
        })
        .count()
}

fn remove_rules(fam: IpFamily, mark: u32, table: u32) -> Result<(), Error> {
    let shown = run("ip", &[fam.flag(), "rule", "show"])?;
    let n = count_rules(&shown, mark, table).min(MAX_STALE_RULES);
    let sel = selector(mark);
    let table_s = table.to_string();
    let mut args: Vec<&str> = vec![fam.flag(), "rule", "del"];
    args.extend(sel.split(' '));
    args.extend(["lookup", &table_s]);
    for _ in 0..n {
        run("ip", &args)?;
    }
    Ok(())
}

/// Installs `fwmark mark/mark lookup table` and `local default dev lo table
/// table` for one family, replacing any earlier copies.
pub fn setup(fam: IpFamily, mark: u32, table: u32) -> Result<(), Error> {
    remove_rules(fam, mark, table)?;
    let sel = selector(mark);
    let table_s = table.to_string();
    let mut args: Vec<&str> = vec![fam.flag(), "rule", "add"];
    args.extend(sel.split(' '));
    args.extend(["lookup", &table_s]);
    run("ip", &args)?;
    run(
        "ip",
        &[
            fam.flag(),
            "route",
            "replace",
            "local",
            fam.default_prefix(),
            "dev",
            "lo",
            "table",
            &table_s,
        ],
    )?;
    Ok(())
}

/// Removes what [`setup`] installed. Idempotent.
pub fn teardown(fam: IpFamily, mark: u32, table: u32) -> Result<(), Error> {
    remove_rules(fam, mark, table)?;
    let table_s = table.to_string();
    let routes = run("ip", &[fam.flag(), "route", "show", "table", &table_s])?;
    if routes.lines().any(|l| l.starts_with("local default")) {
        run(
            "ip",
            &[
                fam.flag(),
                "route",
                "del",
                "local",
                fam.default_prefix(),
                "dev",
                "lo",
                "table",
                &table_s,
            ],
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_only_our_rule() {
        let show = "0:\tfrom all lookup local\n\
                    32763:\tfrom all fwmark 0x1/0x1 lookup 100\n\
                    32764:\tfrom all fwmark 0x1/0x1 lookup 1000\n\
                    32765:\tfrom all fwmark 0x1/0x1 lookup 100\n\
                    32766:\tfrom all lookup main\n";
        assert_eq!(count_rules(show, 1, 100), 2);
        assert_eq!(count_rules(show, 1, 1000), 1);
        assert_eq!(count_rules(show, 2, 100), 0);
    }
}

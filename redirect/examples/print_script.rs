//! Prints the full nftables script for a few frontends (a debugging aid:
//! `cargo run -p redirect --example print_script | nft -c -f -`).
use redirect::{Action, Config, Frontend};

fn main() {
    let cfg = Config {
        table: "lightpath".into(),
        listener_v4: "127.0.0.1:15001".parse().expect("literal"),
        listener_v6: Some("[::1]:15001".parse().expect("literal")),
        mark: 1,
        upstream_mark: 2,
        route_table: 100,
    };
    let mut f = redirect::nft::Frontends::new();
    f.insert(
        Frontend::tcp("10.96.0.10".parse().expect("literal"), 80),
        Action::Proxy,
    );
    f.insert(
        Frontend::tcp("10.96.0.11".parse().expect("literal"), 80),
        Action::Reject,
    );
    f.insert(
        Frontend::tcp("fd00::11".parse().expect("literal"), 80),
        Action::Drop,
    );
    print!("{}", redirect::nft::full_script(&cfg, &f));
}

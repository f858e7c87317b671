//! Prints the full nftables script for a few frontends (a debugging aid:
//! `cargo run -p redirect --example print_script | nft -c -f -`).
use redirect::{Action, Config, Frontend, Rule};

fn main() {
    let cfg = Config {
        table: "lightpath".into(),
        listener_v4: "127.0.0.1:15001".parse().expect("literal"),
        listener_v6: Some("[::1]:15001".parse().expect("literal")),
        mark: 1,
        upstream_mark: 2,
        route_table: 100,
        keep_client_source: true,
    };
    let mut f = redirect::nft::Frontends::new();
    f.insert(
        Frontend::tcp("10.96.0.10".parse().expect("literal"), 80),
        Action::Proxy.into(),
    );
    f.insert(
        Frontend::tcp("10.96.0.11".parse().expect("literal"), 80),
        Action::Reject.into(),
    );
    f.insert(
        Frontend::tcp("fd00::11".parse().expect("literal"), 80),
        Action::Drop.into(),
    );
    f.insert(
        Frontend::tcp("192.0.2.10".parse().expect("literal"), 443),
        Rule::only(
            Action::Proxy,
            ["203.0.113.0/24".parse().expect("literal")].into(),
        ),
    );
    print!("{}", redirect::nft::full_script(&cfg, &f));
}

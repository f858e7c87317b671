//! kube-proxy's local traffic detector flags, `--detect-local-mode` and
//! `--cluster-cidr`, shared by `lightpath run` and `lightpath table`.
//!
//! Why kube-proxy's names and values: an operator replacing kube-proxy
//! carries its configuration over (kubeadm writes `clusterCIDR` into
//! kube-proxy's config), and the same flags must give the same behaviour.
//! What "local" changes is described on [`control::options::DetectLocal`].
//! The interface-based modes (`BridgeInterface`, `InterfaceNamePrefix`) are
//! not offered: lightpath sees accepted sockets, not the interface a packet
//! came in on.

use ipnet::IpNet;

use control::options::DetectLocal;

#[derive(clap::Args, Debug, Clone, serde::Serialize)]
pub struct DetectLocalArgs {
    /// How to tell pods from other sources (kube-proxy's
    /// --detect-local-mode). ClusterCIDR: --cluster-cidr; NodeCIDR: this
    /// Node's spec.podCIDRs. With a detector, ClusterIP traffic from other
    /// sources is masqueraded, as kube-proxy does. Default: ClusterCIDR when
    /// --cluster-cidr is given, otherwise none (every ClusterIP client keeps
    /// its address).
    #[arg(long, env = "LIGHTPATH_DETECT_LOCAL_MODE", value_enum)]
    pub detect_local_mode: Option<Mode>,
    /// The pods' networks, one per family (kube-proxy's --cluster-cidr).
    #[arg(long, env = "LIGHTPATH_CLUSTER_CIDR", value_delimiter = ',')]
    pub cluster_cidr: Vec<IpNet>,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Mode {
    #[value(name = "ClusterCIDR")]
    ClusterCidr,
    #[value(name = "NodeCIDR")]
    NodeCidr,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DetectLocalError {
    #[error("--detect-local-mode ClusterCIDR needs --cluster-cidr (the pods' networks)")]
    NoClusterCidr,
}

impl DetectLocalArgs {
    /// The detector these flags ask for. `--cluster-cidr` networks are
    /// normalised (host bits cleared); with `NodeCIDR` they are not used,
    /// as in kube-proxy.
    pub fn detector(&self) -> Result<DetectLocal, DetectLocalError> {
        let nets: Vec<IpNet> = self.cluster_cidr.iter().map(IpNet::trunc).collect();
        match (self.detect_local_mode, nets.is_empty()) {
            (Some(Mode::NodeCidr), _) => Ok(DetectLocal::NodeCidr),
            (Some(Mode::ClusterCidr), true) => Err(DetectLocalError::NoClusterCidr),
            (_, false) => Ok(DetectLocal::ClusterCidr(nets)),
            (None, true) => Ok(DetectLocal::Unset),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        d: DetectLocalArgs,
    }

    fn parse(args: &[&str]) -> Result<DetectLocal, String> {
        let cli = Cli::try_parse_from(std::iter::once("t").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        cli.d.detector().map_err(|e| e.to_string())
    }

    #[test]
    fn flags_select_kube_proxys_detectors() {
        assert_eq!(parse(&[]), Ok(DetectLocal::Unset));
        assert_eq!(
            parse(&["--cluster-cidr", "10.244.1.7/16,fd00:244::/48"]),
            Ok(DetectLocal::ClusterCidr(vec![
                "10.244.0.0/16".parse().unwrap(),
                "fd00:244::/48".parse().unwrap()
            ]))
        );
        assert_eq!(
            parse(&[
                "--detect-local-mode",
                "ClusterCIDR",
                "--cluster-cidr",
                "10.0.0.0/8"
            ]),
            Ok(DetectLocal::ClusterCidr(vec!["10.0.0.0/8"
                .parse()
                .unwrap()]))
        );
        assert_eq!(
            parse(&["--detect-local-mode", "NodeCIDR"]),
            Ok(DetectLocal::NodeCidr)
        );
        assert_eq!(
            parse(&[
                "--detect-local-mode",
                "NodeCIDR",
                "--cluster-cidr",
                "10.0.0.0/8"
            ]),
            Ok(DetectLocal::NodeCidr)
        );
    }

    #[test]
    fn bad_flags_are_named() {
        let e = parse(&["--detect-local-mode", "ClusterCIDR"]).unwrap_err();
        assert!(e.contains("--cluster-cidr"), "{e}");
        let e = parse(&["--detect-local-mode", "BridgeInterface"]).unwrap_err();
        assert!(e.contains("--detect-local-mode"), "{e}");
        assert!(e.contains("NodeCIDR"), "{e}");
        let e = parse(&["--cluster-cidr", "10.244.0.0/33"]).unwrap_err();
        assert!(e.contains("--cluster-cidr"), "{e}");
    }
}

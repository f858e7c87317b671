//! Server-side filters for the three watches, as kube-proxy sets them.
//!
//! Why filter on the server: a large cluster has many headless services
//! (StatefulSets) and, beside kube-proxy in hybrid mode, many services that
//! are not ours; not receiving them saves memory and CPU on every node.
//! kube-proxy uses `!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name`
//! for both Services and EndpointSlices (the EndpointSlice controller copies
//! a Service's labels onto its slices). We differ in one place: services
//! labelled with OUR proxy name must be seen, and "absent or equal to ours"
//! is not expressible as a label selector, so in the default mode the
//! proxy-name rule is left to [`crate::ClusterState`], which applies it
//! exactly (and would regardless of what the server sends).

use crate::objects::{LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME};
use crate::options::Options;

/// Label selector for Services and EndpointSlices.
pub fn label_selector(opts: &Options) -> String {
    if opts.labelled_only {
        format!(
            "!{LABEL_HEADLESS},{LABEL_SERVICE_PROXY_NAME}={}",
            opts.proxy_name
        )
    } else {
        format!("!{LABEL_HEADLESS}")
    }
}

/// Field selector for this node's Node object.
pub fn node_field_selector(opts: &Options) -> String {
    format!("metadata.name={}", opts.node_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_and_labelled_only() {
        let mut o = Options {
            node_name: "n1".into(),
            ..Options::default()
        };
        assert_eq!(label_selector(&o), "!service.kubernetes.io/headless");
        o.labelled_only = true;
        assert_eq!(
            label_selector(&o),
            "!service.kubernetes.io/headless,service.kubernetes.io/service-proxy-name=lightpath"
        );
        assert_eq!(node_field_selector(&o), "metadata.name=n1");
    }
}

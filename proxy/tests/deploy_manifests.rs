//! The rendered deploy manifests against the code they deploy: every overlay
//! is rendered with `kubectl kustomize` and validated offline
//! (deploy/validate.py), then the properties an operator relies on are
//! checked against the binary itself: its `--help` (env names, flags), its
//! health server (probe paths), its defaults (ports) and the Kubernetes
//! requests its kube source really makes (RBAC).

mod support {
    pub mod deploy;
}

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde_yaml::Value;
use support::deploy::{render_overlay, repo, require_kubectl};

const OVERLAYS: &[&str] = &["replace-kube-proxy", "hybrid", "hybrid-cert-manager"];
/// Read by kube's in-cluster configuration, not by a lightpath flag.
const KUBE_CLIENT_ENV: &[&str] = &["KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"];

/// Objects of one overlay, rendered once per test process.
fn rendered(overlay: &str) -> &'static [Value] {
    static CACHE: OnceLock<Mutex<BTreeMap<String, &'static [Value]>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut cache = cache.lock().expect("cache");
    if let Some(docs) = cache.get(overlay) {
        return docs;
    }
    let docs: Vec<Value> = render_overlay(overlay);
    let docs: &'static [Value] = Vec::leak(docs);
    cache.insert(overlay.to_string(), docs);
    docs
}

fn objects<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn object<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("{kind}/{name} not rendered"))
}

fn str_of(v: &Value) -> &str {
    v.as_str()
        .unwrap_or_else(|| panic!("expected a string, got {v:?}"))
}

fn strings(v: &Value) -> BTreeSet<String> {
    v.as_sequence()
        .map(|s| s.iter().map(|x| str_of(x).to_string()).collect())
        .unwrap_or_default()
}

fn node_proxy(docs: &[Value]) -> &Value {
    let ds = objects(docs, "DaemonSet");
    assert_eq!(ds.len(), 1, "exactly one DaemonSet");
    ds[0]
}

fn only_container(workload: &Value) -> &Value {
    let c = workload["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .expect("containers");
    assert_eq!(c.len(), 1);
    &c[0]
}

fn port_of(addr: &str) -> u64 {
    addr.parse::<std::net::SocketAddr>()
        .expect("address")
        .port() as u64
}

/// `NAME -> value` of every env var a container gets: `env` entries (value
/// or "<ref>") and every key of the ConfigMaps it loads with `envFrom`.
fn container_env(docs: &[Value], container: &Value) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for from in container["envFrom"].as_sequence().into_iter().flatten() {
        let name = str_of(&from["configMapRef"]["name"]);
        let cm = object(docs, "ConfigMap", name);
        for (k, v) in cm["data"].as_mapping().into_iter().flatten() {
            env.insert(str_of(k).to_string(), str_of(v).to_string());
        }
    }
    for e in container["env"].as_sequence().into_iter().flatten() {
        let value = e["value"].as_str().unwrap_or("<ref>").to_string();
        env.insert(str_of(&e["name"]).to_string(), value);
    }
    env
}

/// `--help` of a lightpath subcommand, from the binary this test builds.
fn help(subcommand: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_lightpath"))
        .args([subcommand, "--help"])
        .output()
        .expect("run lightpath");
    assert!(out.status.success(), "lightpath {subcommand} --help failed");
    String::from_utf8(out.stdout).expect("utf-8 help")
}

/// The `[env: NAME=` names and `--flag` names a help text documents.
fn help_env_and_flags(help: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut envs = BTreeSet::new();
    for part in help.split("[env: ").skip(1) {
        if let Some(name) = part.split('=').next() {
            envs.insert(name.trim().to_string());
        }
    }
    let flags = help
        .split_whitespace()
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.trim_end_matches([',', '.']).to_string())
        .collect();
    (envs, flags)
}

fn drain_default(run_help: &str) -> u64 {
    let after = run_help
        .split("--drain-timeout")
        .nth(1)
        .expect("run --help documents --drain-timeout");
    let default = after
        .split("[default: ")
        .nth(1)
        .and_then(|s| s.split(']').next())
        .expect("--drain-timeout has a default");
    default.parse().expect("numeric default")
}

#[test]
fn every_overlay_renders_and_validates_offline() {
    require_kubectl();
    let out = Command::new("python3")
        .arg(repo().join("deploy/validate.py"))
        .output()
        .expect("python3 is needed for deploy/validate.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "deploy/validate.py failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every overlay was covered, and something was validated for each.
    for overlay in OVERLAYS {
        assert!(
            stdout.contains(&format!("ok   {overlay} DaemonSet/lightpath")),
            "{overlay} not validated:\n{stdout}"
        );
    }
    assert!(stdout.contains(" 0 failed"), "{stdout}");
}

#[test]
fn node_proxy_runs_with_three_capabilities_not_privileged() {
    for overlay in OVERLAYS {
        let docs = rendered(overlay);
        let ds = node_proxy(docs);
        let pod = &ds["spec"]["template"]["spec"];
        let c = only_container(ds);
        let sc = &c["securityContext"];
        assert_eq!(sc["privileged"], Value::Bool(false), "{overlay}");
        assert_eq!(
            sc["allowPrivilegeEscalation"],
            Value::Bool(false),
            "{overlay}"
        );
        assert_eq!(
            strings(&sc["capabilities"]["add"]),
            ["NET_ADMIN", "NET_RAW", "NET_BIND_SERVICE"]
                .map(String::from)
                .into(),
            "{overlay}: exactly these capabilities"
        );
        assert_eq!(
            strings(&sc["capabilities"]["drop"]),
            ["ALL".to_string()].into()
        );
        assert!(pod["hostPID"].is_null() && pod["hostIPC"].is_null());
        assert_eq!(pod["hostNetwork"], Value::Bool(true));
        assert_eq!(pod["priorityClassName"], "system-node-critical");
        let tolerations = pod["tolerations"].as_sequence().expect("tolerations");
        assert!(
            tolerations
                .iter()
                .any(|t| t["operator"] == "Exists" && t["key"].is_null()),
            "{overlay}: tolerates every taint"
        );
        // No node ever without a proxy during a rollout.
        let ru = &ds["spec"]["updateStrategy"]["rollingUpdate"];
        assert_eq!(ds["spec"]["updateStrategy"]["type"], "RollingUpdate");
        assert_eq!(ru["maxUnavailable"].as_u64(), Some(0), "{overlay}");
        assert_eq!(ru["maxSurge"].as_u64(), Some(1), "{overlay}");
        // Host-network ports are hostPorts: declaring any would keep the
        // surge pod off the node.
        assert!(c["ports"].is_null(), "{overlay}: no declared ports");
        // NODE_NAME from the downward API.
        let node_name = c["env"]
            .as_sequence()
            .and_then(|e| e.iter().find(|e| e["name"] == "NODE_NAME"))
            .expect("NODE_NAME env");
        assert_eq!(
            node_name["valueFrom"]["fieldRef"]["fieldPath"],
            "spec.nodeName"
        );
        assert!(c["resources"]["requests"]["cpu"].is_string());
        assert!(c["resources"]["requests"]["memory"].is_string());
        assert_eq!(c["args"][0], "run");
    }
    // Without kube-proxy, cluster DNS is a Service lightpath itself carries.
    assert_eq!(
        node_proxy(rendered("replace-kube-proxy"))["spec"]["template"]["spec"]["dnsPolicy"],
        "Default"
    );
    assert_eq!(
        node_proxy(rendered("hybrid"))["spec"]["template"]["spec"]["dnsPolicy"],
        "ClusterFirstWithHostNet"
    );
}

/// GET `path` on a loopback server; returns the status code.
async fn get_status(addr: std::net::SocketAddr, path: &str) -> u16 {
    use http_body_util::{BodyExt, Empty};
    let tcp = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("connect");
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", "localhost")
        .body(Empty::<bytes::Bytes>::new())
        .expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(5), send.send_request(req))
        .await
        .expect("answer in time")
        .expect("response");
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    status
}

#[tokio::test]
async fn probes_and_scrape_point_at_the_real_servers() {
    use lightpath::defaults::{HEALTH_ADDR, METRICS_ADDR};
    // The real health server of the binary, on loopback.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    let handler = lightpath::health::proxy_health_handler(
        lightpath::health::ProxyHealth::new(lightpath::health::DEFAULT_HEALTH_TIMEOUT),
        lightpath::lifecycle::Readiness::default(),
    );
    tokio::spawn(lightpath::admin::web::serve(listener, handler, stopped));
    assert_eq!(
        get_status(addr, "/no-such-path").await,
        404,
        "the server 404s unknown paths"
    );

    for overlay in OVERLAYS {
        let docs = rendered(overlay);
        let ds = node_proxy(docs);
        let c = only_container(ds);
        for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
            let get = &c[probe]["httpGet"];
            if get.is_null() {
                assert_ne!(
                    probe, "readinessProbe",
                    "{overlay}: readiness probe required"
                );
                assert_ne!(probe, "livenessProbe", "{overlay}: liveness probe required");
                continue;
            }
            assert_eq!(
                get["port"].as_u64(),
                Some(port_of(HEALTH_ADDR)),
                "{overlay} {probe}: kubelet reaches the health server, not the loopback admin API"
            );
            assert!(get["scheme"].is_null() || get["scheme"] == "HTTP");
            let path = str_of(&get["path"]);
            let status = get_status(addr, path).await;
            assert_ne!(status, 404, "{overlay} {probe}: {path} is not served");
        }
        let annotations = &ds["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(annotations["prometheus.io/scrape"], "true");
        assert_eq!(
            str_of(&annotations["prometheus.io/port"])
                .parse::<u64>()
                .ok(),
            Some(port_of(METRICS_ADDR)),
            "{overlay}: scrape the metrics listener"
        );
        assert_eq!(annotations["prometheus.io/path"], "/metrics");
    }
}

#[test]
fn env_and_flags_are_ones_the_binary_reads() {
    let run_help = help("run");
    let (run_env, _) = help_env_and_flags(&run_help);
    assert!(
        run_env.contains("NODE_NAME"),
        "sanity: help parsed: {run_env:?}"
    );
    let webhook_help = help("webhook");
    let (webhook_env, webhook_flags) = help_env_and_flags(&webhook_help);
    for overlay in OVERLAYS {
        let docs = rendered(overlay);
        let ds = node_proxy(docs);
        let env = container_env(docs, only_container(ds));
        for name in env.keys() {
            assert!(
                run_env.contains(name) || KUBE_CLIENT_ENV.contains(&name.as_str()),
                "{overlay}: DaemonSet sets {name}, which `lightpath run` does not read \
                 (its env: {run_env:?})"
            );
        }
        for d in objects(docs, "Deployment") {
            let c = only_container(d);
            assert_eq!(c["args"][0], "webhook");
            for name in container_env(docs, c).keys() {
                assert!(
                    webhook_env.contains(name),
                    "{overlay}: webhook sets {name}, which `lightpath webhook` does not read"
                );
            }
            for arg in c["args"].as_sequence().expect("args").iter().skip(1) {
                let flag = str_of(arg).split('=').next().unwrap_or_default();
                assert!(
                    webhook_flags.contains(flag),
                    "{overlay}: webhook arg {flag} is not a `lightpath webhook` flag"
                );
            }
        }
    }
}

#[test]
fn labelled_only_per_overlay_and_one_proxy_name() {
    for (overlay, labelled_only) in [
        ("replace-kube-proxy", "false"),
        ("hybrid", "true"),
        ("hybrid-cert-manager", "true"),
    ] {
        let docs = rendered(overlay);
        let env = container_env(docs, only_container(node_proxy(docs)));
        assert_eq!(
            env.get("LIGHTPATH_LABELLED_ONLY").map(String::as_str),
            Some(labelled_only),
            "{overlay}"
        );
        let proxy_name = env.get("LIGHTPATH_PROXY_NAME").expect("proxy name set");
        assert_eq!(proxy_name, lightpath::defaults::PROXY_NAME);
        // The webhook writes the value the node proxies answer to: the same
        // ConfigMap key, not a copy.
        for d in objects(docs, "Deployment") {
            let from = only_container(d)["env"]
                .as_sequence()
                .and_then(|e| e.iter().find(|e| e["name"] == "LIGHTPATH_PROXY_NAME"))
                .expect("webhook gets LIGHTPATH_PROXY_NAME");
            let key = &from["valueFrom"]["configMapKeyRef"];
            assert_eq!(key["name"], "lightpath-config");
            assert_eq!(key["key"], "LIGHTPATH_PROXY_NAME");
        }
    }
    assert!(objects(
        rendered("replace-kube-proxy"),
        "MutatingWebhookConfiguration"
    )
    .is_empty());
}

#[test]
fn grace_period_covers_the_drain_deadline() {
    let default = drain_default(&help("run"));
    for overlay in OVERLAYS {
        let docs = rendered(overlay);
        let ds = node_proxy(docs);
        let env = container_env(docs, only_container(ds));
        let drain = env
            .get("LIGHTPATH_DRAIN_TIMEOUT")
            .map(|v| v.parse::<u64>().expect("numeric LIGHTPATH_DRAIN_TIMEOUT"))
            .unwrap_or(default);
        let grace = ds["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .expect("terminationGracePeriodSeconds");
        // The surge pod is serving when the old pod exits: the old one must
        // leave the rules in place.
        assert!(
            !env.contains_key("LIGHTPATH_REMOVE_RULES_ON_EXIT"),
            "{overlay}: removing rules on exit would cut off the surge pod"
        );
        assert!(
            grace >= drain + 5,
            "{overlay}: grace {grace}s must exceed the drain deadline {drain}s with room to spare"
        );
    }
}

#[test]
fn webhook_configuration_is_safe_and_matches_the_server() {
    use lightpath::webhook::server::{HEALTH_PATH, MUTATE_PATH};
    for overlay in ["hybrid", "hybrid-cert-manager"] {
        let docs = rendered(overlay);
        let mwcs = objects(docs, "MutatingWebhookConfiguration");
        assert_eq!(mwcs.len(), 1);
        let hooks = mwcs[0]["webhooks"].as_sequence().expect("webhooks");
        assert_eq!(hooks.len(), 1);
        let hook = &hooks[0];
        assert_eq!(
            hook["failurePolicy"], "Ignore",
            "an outage never blocks Services"
        );
        let timeout = hook["timeoutSeconds"].as_u64().expect("timeoutSeconds");
        assert!((1..=10).contains(&timeout));
        assert_eq!(hook["sideEffects"], "None");
        assert_eq!(
            strings(&hook["admissionReviewVersions"]),
            ["v1".to_string()].into()
        );
        let rules = hook["rules"].as_sequence().expect("rules");
        assert_eq!(rules.len(), 1);
        assert_eq!(
            strings(&rules[0]["operations"]),
            ["CREATE".to_string()].into()
        );
        assert_eq!(
            strings(&rules[0]["resources"]),
            ["services".to_string()].into()
        );
        assert_eq!(strings(&rules[0]["apiGroups"]), [String::new()].into());

        // The Service reference reaches the container's listener and path.
        let svc_ref = &hook["clientConfig"]["service"];
        assert_eq!(svc_ref["path"], MUTATE_PATH);
        let svc = object(docs, "Service", str_of(&svc_ref["name"]));
        assert_eq!(svc["metadata"]["namespace"], svc_ref["namespace"]);
        let svc_port = svc["spec"]["ports"]
            .as_sequence()
            .and_then(|p| p.iter().find(|p| p["port"] == svc_ref["port"]))
            .expect("Service port the webhook configuration names");
        let deploy = objects(docs, "Deployment");
        assert_eq!(deploy.len(), 1);
        let c = only_container(deploy[0]);
        let container_port = c["ports"]
            .as_sequence()
            .and_then(|ps| ps.iter().find(|p| p["name"] == svc_port["targetPort"]))
            .expect("targetPort names a container port");
        let args: Vec<&str> = c["args"]
            .as_sequence()
            .expect("args")
            .iter()
            .map(str_of)
            .collect();
        let listen = args
            .iter()
            .find_map(|a| a.strip_prefix("--listen="))
            .expect("--listen");
        assert_eq!(
            container_port["containerPort"].as_u64(),
            Some(port_of(listen))
        );
        for probe in ["readinessProbe", "livenessProbe"] {
            assert_eq!(c[probe]["httpGet"]["path"], HEALTH_PATH);
            assert_eq!(c[probe]["httpGet"]["scheme"], "HTTPS");
            assert_eq!(c[probe]["httpGet"]["port"].as_u64(), Some(port_of(listen)));
        }
        // The namespaces the API server never sends are the ones the
        // webhook itself skips, and include kube-system.
        let excluded: BTreeSet<String> = args
            .iter()
            .filter_map(|a| a.strip_prefix("--exclude-namespace="))
            .flat_map(|v| v.split(','))
            .map(String::from)
            .collect();
        let selector = hook["namespaceSelector"]["matchExpressions"]
            .as_sequence()
            .and_then(|m| {
                m.iter()
                    .find(|e| e["key"] == "kubernetes.io/metadata.name" && e["operator"] == "NotIn")
            })
            .expect("namespaceSelector excludes by name");
        assert_eq!(strings(&selector["values"]), excluded);
        assert!(excluded.contains("kube-system"));
        // The webhook runs unprivileged.
        let sc = &c["securityContext"];
        assert_eq!(sc["runAsNonRoot"], Value::Bool(true));
        assert_eq!(
            strings(&sc["capabilities"]["drop"]),
            ["ALL".to_string()].into()
        );
        assert!(sc["capabilities"]["add"].is_null());
    }
    // Certificates: bootstrap in hybrid, cert-manager files and CA injection
    // (and no bootstrap RBAC) with the component.
    let hybrid = rendered("hybrid");
    let args = strings(&only_container(objects(hybrid, "Deployment")[0])["args"]);
    assert!(args.iter().any(|a| a.starts_with("--bootstrap-secret=")));
    let cm = rendered("hybrid-cert-manager");
    let args = strings(&only_container(objects(cm, "Deployment")[0])["args"]);
    assert!(args.iter().any(|a| a.starts_with("--tls-cert=")));
    assert!(!args.iter().any(|a| a.starts_with("--bootstrap-secret")));
    let mwc = objects(cm, "MutatingWebhookConfiguration")[0];
    assert_eq!(
        mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
        "lightpath-system/lightpath-webhook"
    );
    assert!(objects(cm, "Role").is_empty() && objects(cm, "RoleBinding").is_empty());
    let cert = object(cm, "Certificate", "lightpath-webhook");
    let secret_volume = objects(cm, "Deployment")[0]["spec"]["template"]["spec"]["volumes"]
        .as_sequence()
        .and_then(|v| v.iter().find(|v| !v["secret"].is_null()))
        .expect("secret volume");
    assert_eq!(
        secret_volume["secret"]["secretName"],
        cert["spec"]["secretName"]
    );
}

/// `(apiGroup, resource) -> verbs` granted by a ClusterRole or Role.
fn granted(role: &Value) -> BTreeMap<(String, String), BTreeSet<String>> {
    let mut out: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for rule in role["rules"].as_sequence().expect("rules") {
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                out.entry((group.clone(), resource))
                    .or_default()
                    .extend(strings(&rule["verbs"]));
            }
        }
    }
    out
}

/// The Kubernetes verb of one request, as RBAC names it.
fn verb_of(method: &http::Method, path: &str, query: &str) -> (String, String, String) {
    // /api/v1/[namespaces/NS/]RESOURCE[/NAME] or /apis/GROUP/VERSION/...
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match parts.first() {
        Some(&"api") => (String::new(), &parts[2..]),
        Some(&"apis") => (parts[1].to_string(), &parts[3..]),
        _ => panic!("not a resource path: {path}"),
    };
    let rest = if rest.first() == Some(&"namespaces") && rest.len() > 2 {
        &rest[2..]
    } else {
        rest
    };
    let resource = rest[0].to_string();
    let named = rest.len() > 1;
    let watch = query
        .split('&')
        .any(|kv| kv == "watch=true" || kv == "watch=1");
    let verb = match (method.as_str(), named, watch) {
        ("GET", _, true) => "watch",
        ("GET", false, false) => "list",
        ("GET", true, false) => "get",
        ("POST", _, _) => "create",
        ("PUT", _, _) => "update",
        ("PATCH", _, _) => "patch",
        ("DELETE", true, _) => "delete",
        ("DELETE", false, _) => "deletecollection",
        (m, _, _) => panic!("unexpected method {m}"),
    };
    (group, resource, verb.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_proxy_rbac_is_exactly_what_the_kube_source_requests() {
    use kube::client::ConfigExt;
    use tower::ServiceBuilder;

    let api = fakeapi::FakeApi::start().await.expect("fake API server");
    let config = kube::Config::new(api.url().parse().expect("url"));
    let seen: Arc<Mutex<BTreeSet<(String, String, String)>>> = Default::default();
    let record = seen.clone();
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .map_request(move |req: http::Request<kube::client::Body>| {
            let v = verb_of(
                req.method(),
                req.uri().path(),
                req.uri().query().unwrap_or(""),
            );
            record.lock().expect("record").insert(v);
            req
        })
        .service(
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http(),
        );
    let client = kube::Client::new(service, "default");
    let opts = control::Options {
        node_name: "node-a".into(),
        ..Default::default()
    };
    let source = control::kube::watch_cluster(client, opts);
    let mut ready = source.ready.clone();
    tokio::time::timeout(Duration::from_secs(20), ready.wait_for(|r| *r))
        .await
        .expect("kube source ready within 20 s")
        .expect("ready channel");
    // Let the watches that follow the initial lists start.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let watches = seen
            .lock()
            .expect("seen")
            .iter()
            .filter(|(_, _, v)| v == "watch")
            .count();
        if watches >= 3 || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    source.task.abort();

    let mut used: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for (group, resource, verb) in seen.lock().expect("seen").iter() {
        used.entry((group.clone(), resource.clone()))
            .or_default()
            .insert(verb.clone());
    }
    for overlay in OVERLAYS {
        let docs = rendered(overlay);
        let role = object(docs, "ClusterRole", "lightpath");
        assert_eq!(
            granted(role),
            used,
            "{overlay}: ClusterRole lightpath must grant exactly what the kube source requests"
        );
        // ...and it is bound to the DaemonSet's service account.
        let binding = object(docs, "ClusterRoleBinding", "lightpath");
        let sa = str_of(&node_proxy(docs)["spec"]["template"]["spec"]["serviceAccountName"]);
        assert_eq!(binding["subjects"][0]["name"], sa);
        assert_eq!(binding["roleRef"]["name"], "lightpath");
    }
}

#[test]
fn readme_deploy_section_names_real_metrics_and_overlays() {
    use lightpath::metrics::names;
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README.md");
    let section = readme
        .split("## Deploy")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("README has a Deploy section");
    for metric in [
        names::TCP_OPENED,
        names::HTTP_REQUESTS,
        names::TABLE_FRONTENDS,
    ] {
        assert!(
            section.contains(metric),
            "Deploy section should name {metric}"
        );
    }
    for overlay in OVERLAYS {
        assert!(section.contains(&format!("deploy/overlays/{overlay}")));
        assert!(repo().join("deploy/overlays").join(overlay).is_dir());
    }
}

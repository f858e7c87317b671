//! `fakeapi --objects FILE --kubeconfig OUT`: the fake API server as a
//! process, loaded with the objects of a manifest file.
//!
//! Why a binary: the load benchmark (`benches/load/run.py --source kube`)
//! runs `lightpath run --kubeconfig`, so the Kubernetes watcher, not the
//! file source, feeds the data plane under load, as on a node. The
//! benchmark then changes objects over HTTP (`PUT`) while traffic flows.
//!
//! FILE holds one JSON object per `---`-separated document (Services,
//! EndpointSlices, Nodes), as the benchmark writes its manifests. The server
//! listens on a free loopback port; OUT gets a kubeconfig for it, written
//! after every object is loaded, and `READY <url>` goes to stdout. It serves
//! until killed.

use std::path::PathBuf;
use std::process::ExitCode;

use fakeapi::{FakeApi, Kind};
use serde_json::Value;

fn usage() -> ExitCode {
    eprintln!("usage: fakeapi --objects FILE --kubeconfig OUT");
    ExitCode::from(2)
}

/// The documents of `text` as (kind, object); an error names the document.
fn objects(text: &str) -> Result<Vec<(Kind, Value)>, String> {
    let mut out = Vec::new();
    for (i, doc) in text
        .split("---\n")
        .filter(|d| !d.trim().is_empty())
        .enumerate()
    {
        let obj: Value =
            serde_json::from_str(doc).map_err(|e| format!("document {}: {e}", i + 1))?;
        let kind = obj["kind"].as_str().unwrap_or_default();
        let kind = Kind::from_kind(kind)
            .ok_or_else(|| format!("document {}: unsupported kind {kind:?}", i + 1))?;
        out.push((kind, obj));
    }
    Ok(out)
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (mut file, mut kubeconfig) = (None, None);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--objects" => file = args.next().map(PathBuf::from),
            "--kubeconfig" => kubeconfig = args.next().map(PathBuf::from),
            _ => return usage(),
        }
    }
    let (Some(file), Some(kubeconfig)) = (file, kubeconfig) else {
        return usage();
    };
    let loaded = std::fs::read_to_string(&file)
        .map_err(|e| e.to_string())
        .and_then(|t| objects(&t));
    let objs = match loaded {
        Ok(o) => o,
        Err(e) => {
            eprintln!("fakeapi: {}: {e}", file.display());
            return ExitCode::FAILURE;
        }
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fakeapi: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let api = match FakeApi::start().await {
            Ok(a) => a,
            Err(e) => {
                eprintln!("fakeapi: {e}");
                return ExitCode::FAILURE;
            }
        };
        let n = objs.len();
        if let Err(e) = api.apply_many(objs) {
            eprintln!("fakeapi: loading {}: {e}", file.display());
            return ExitCode::FAILURE;
        }
        if let Err(e) = api.write_kubeconfig(&kubeconfig) {
            eprintln!("fakeapi: {}: {e}", kubeconfig.display());
            return ExitCode::FAILURE;
        }
        println!("READY {} ({n} objects)", api.url());
        std::future::pending::<ExitCode>().await
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_become_objects_and_errors_name_the_document() {
        let text = "---\n{\"kind\":\"Service\",\"metadata\":{\"name\":\"a\"}}\n\
                    ---\n{\"kind\":\"EndpointSlice\",\"metadata\":{\"name\":\"a-1\"}}\n";
        let objs = objects(text).expect("two documents");
        assert_eq!(objs.len(), 2);
        assert!(matches!(objs[1].0, Kind::EndpointSlice));
        let bad = objects("---\n{\"kind\":\"Pod\"}\n").unwrap_err();
        assert!(bad.contains("document 1") && bad.contains("Pod"), "{bad}");
        let broken = objects("---\n{\"kind\":\n").unwrap_err();
        assert!(broken.starts_with("document 1:"), "{broken}");
    }
}

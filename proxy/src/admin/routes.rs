//! Request routing for the admin API and the metrics-only listener.

use std::sync::Arc;

use control::Table;
use http::{header, HeaderValue, Request, StatusCode};
use hyper::body::Incoming;
use metrics_exporter_prometheus::PrometheusHandle;

use super::dump::{self, ServiceQuery};
use super::web::{self, Handler, Resp};
use super::AdminState;

/// Prometheus text exposition format 0.0.4.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

const INDEX: &str = "lightpath admin API
  /ready                      200 when ready; JSON says what it still waits for
  /healthz, /livez            kube-proxy's health semantics (last table sync recent)
  /metrics                    Prometheus text
  /config_dump                table, balancer state per endpoint, ejections, settings
  /endpoints?service=ns/name  one service's endpoints and balancer state
";

pub(super) fn admin_handler(state: AdminState, prometheus: PrometheusHandle) -> Handler {
    Arc::new(move |req: &Request<Incoming>| match req.uri().path() {
        "/" => web::text(StatusCode::OK, INDEX),
        "/ready" => crate::health::readyz(&state.readiness),
        "/healthz" => crate::health::healthz(&state.health),
        "/livez" => crate::health::livez(&state.health),
        "/metrics" => render_metrics(&state, &prometheus),
        "/config_dump" => config_dump(&state),
        "/endpoints" => endpoints(&state, req.uri().query()),
        _ => web::text(StatusCode::NOT_FOUND, "not found; see /\n"),
    })
}

pub(super) fn metrics_only_handler(state: AdminState, prometheus: PrometheusHandle) -> Handler {
    Arc::new(move |req: &Request<Incoming>| match req.uri().path() {
        "/metrics" => render_metrics(&state, &prometheus),
        _ => web::text(StatusCode::NOT_FOUND, "only /metrics is served here\n"),
    })
}

fn render_metrics(state: &AdminState, prometheus: &PrometheusHandle) -> Resp {
    let node = crate::metrics::node();
    node.refresh(state.data_plane.as_ref());
    let table = state.table.borrow().clone();
    let ejected = state
        .balancers
        .as_ref()
        .or_else(|| state.late_balancers.get())
        .map_or(0, |b| b.ejected(&table));
    node.set_ejected(ejected);
    let mut r = web::text(StatusCode::OK, prometheus.render());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(PROMETHEUS_TEXT),
    );
    r
}

fn balancers(state: &AdminState, table: &Table) -> Vec<dump::BalancerState> {
    state
        .balancers
        .as_ref()
        .or_else(|| state.late_balancers.get())
        .map(|b| b.balancers(table))
        .unwrap_or_default()
}

fn config_dump(state: &AdminState) -> Resp {
    let table = state.table.borrow().clone();
    let doc = dump::config_dump(
        &table,
        state.readiness.status(),
        state.health.report(),
        &state.settings,
        balancers(state, &table),
    );
    web::json(StatusCode::OK, &doc)
}

fn endpoints(state: &AdminState, query: Option<&str>) -> Resp {
    let service = query.and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "service")
            .map(|(_, v)| v.into_owned())
    });
    let Some(service) = service else {
        return web::text(
            StatusCode::BAD_REQUEST,
            "missing query parameter: service=namespace/name[:port]\n",
        );
    };
    let q = match ServiceQuery::parse(&service) {
        Ok(q) => q,
        Err(e) => return web::text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    let table = state.table.borrow().clone();
    let found = dump::endpoints(&table, &q, &balancers(state, &table));
    if found.is_empty() {
        return web::text(
            StatusCode::NOT_FOUND,
            format!(
                "no service port {service} in table version {}\n",
                table.version
            ),
        );
    }
    web::json(StatusCode::OK, &found)
}

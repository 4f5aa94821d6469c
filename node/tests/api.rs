//! The REST API of a real daemon: each endpoint's success and error cases (bad JSON,
//! unknown VM, read-only token, missing and wrong token, conflicts, replayed command
//! ids), every answer checked against the OpenAPI document the daemon serves (which
//! must equal the committed node/openapi.json), and the CLI's `--json` and exit codes.

mod common;

use std::process::Command;

use common::*;
use serde_json::{json, Value};

struct Api {
    base: String,
    doc: Value,
    agent: ureq::Agent,
    checked: std::cell::RefCell<Vec<String>>,
}

impl Api {
    fn new(plan: &ClusterPlan) -> Api {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let base = format!("http://{}", plan.api[0]);
        let mut r = agent
            .get(&format!("{base}/api/v1/openapi.json"))
            .call()
            .expect("openapi");
        let text = r.body_mut().read_to_string().unwrap();
        let committed = std::fs::read_to_string(repo_root().join("node/openapi.json")).unwrap();
        assert_eq!(
            text.trim(),
            committed.trim(),
            "the served OpenAPI document differs from node/openapi.json"
        );
        Api {
            base,
            doc: serde_json::from_str(&text).unwrap(),
            agent,
            checked: Default::default(),
        }
    }

    /// Sends a request; checks the status is documented for the operation and the body
    /// matches its schema; returns (status, body).
    fn call(
        &self,
        method: &str,
        template: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
        id: Option<&str>,
    ) -> (u16, Value) {
        let url = format!("{}{path}", self.base);
        let mut b = ureq::http::Request::builder().method(method).uri(&url);
        if let Some(t) = token {
            b = b.header("Authorization", format!("Bearer {t}"));
        }
        if let Some(id) = id {
            b = b.header("X-Command-Id", id);
        }
        let resp = match body {
            Some(text) => self.agent.run(
                b.header("Content-Type", "application/json")
                    .body(text.to_string())
                    .unwrap(),
            ),
            // An explicit empty body (Content-Length: 0), as curl and most clients send.
            None if method != "GET" => self.agent.run(b.body(String::new()).unwrap()),
            None => self.agent.run(b.body(()).unwrap()),
        };
        let mut resp = resp.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap();
        let value: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {path}: {status} not JSON ({e}): {text}"));
        self.validate(method, template, status, &value);
        self.checked
            .borrow_mut()
            .push(format!("{method} {template} {status}"));
        (status, value)
    }

    fn validate(&self, method: &str, template: &str, status: u16, body: &Value) {
        let op = &self.doc["paths"][template][method.to_lowercase()];
        assert!(
            op.is_object(),
            "{method} {template} is not in the OpenAPI document"
        );
        let resp = &op["responses"][status.to_string()];
        assert!(
            resp.is_object(),
            "{method} {template} answered {status}, which the document does not list: {body}"
        );
        let schema = &resp["content"]["application/json"]["schema"];
        if schema.is_null() {
            return;
        }
        let mut root = json!({ "components": self.doc["components"] });
        root["allOf"] = json!([schema]);
        let v = jsonschema::validator_for(&root).expect("schema compiles");
        let errors: Vec<String> = v
            .iter_errors(body)
            .map(|e| format!("{e} at {}", e.instance_path))
            .collect();
        assert!(
            errors.is_empty(),
            "{method} {template} {status}: body does not match the document: {errors:?}\n{body}"
        );
    }
}

#[test]
fn every_endpoint_success_and_errors_match_the_openapi_document() {
    let mut plan = ClusterPlan::new();
    plan.boot_grace_ms = 200;
    let _reaper = VmmReaper(&plan);
    let d = Daemon::start(&plan, 0);
    let api = Api::new(&plan);
    let (a, r) = (Some(ADMIN), Some(READER));
    // The validation is real: a body that does not fit the document is caught.
    let wrong = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        api.validate("GET", "/api/v1/vms", 200, &json!([{"spec": 1}]))
    }));
    assert!(
        wrong.is_err(),
        "a malformed VM list passed the schema check"
    );

    // Tokens: missing, wrong, read-only on a change.
    assert_eq!(
        api.call("GET", "/api/v1/vms", "/api/v1/vms", None, None, None)
            .0,
        401
    );
    let (s, b) = api.call(
        "GET",
        "/api/v1/vms",
        "/api/v1/vms",
        Some("not-a-valid-token-xx"),
        None,
        None,
    );
    assert_eq!((s, b["kind"].as_str()), (401, Some("unauthorized")));
    assert_eq!(
        api.call("GET", "/api/v1/vms", "/api/v1/vms", r, None, None),
        (200, json!([]))
    );

    // Nodes.
    let (s, nodes) = api.call("GET", "/api/v1/nodes", "/api/v1/nodes", r, None, None);
    assert_eq!(s, 200);
    assert_eq!(nodes[0]["state"], "local");
    assert_eq!(nodes[1]["name"], "pm2");
    assert_eq!(
        api.call(
            "GET",
            "/api/v1/nodes/{name}",
            "/api/v1/nodes/pm2",
            r,
            None,
            None
        )
        .0,
        200
    );
    let (s, b) = api.call(
        "GET",
        "/api/v1/nodes/{name}",
        "/api/v1/nodes/pm9",
        r,
        None,
        None,
    );
    assert_eq!(s, 404);
    assert!(b["error"].as_str().unwrap().contains("pm1, pm2"));

    // Maintenance: workon / finalize (nothing runs yet, so working on this node while
    // its peer is away is allowed).
    maintenance_endpoints(&api, a, r);
    assert_eq!(
        api.call("GET", "/api/v1/nodes", "/api/v1/nodes", None, None, None)
            .0,
        401
    );

    // Create: bad JSON, unknown field, invalid values, read-only, success, conflict, replay.
    let create =
        |tok, body: &str, id| api.call("POST", "/api/v1/vms", "/api/v1/vms", tok, Some(body), id);
    let (s, b) = create(a, "{\"name\": ", None);
    assert_eq!((s, b["kind"].as_str()), (400, Some("bad-request")));
    assert!(
        b["error"].as_str().unwrap().contains("line 1 column"),
        "{b}"
    );
    let mut spec = serde_json::to_value(common::spec(
        "web",
        "unprotected",
        "pm1",
        &["counter"],
        false,
    ))
    .unwrap();
    let mut bogus = spec.clone();
    bogus["colour"] = json!("red");
    let (s, b) = create(a, &bogus.to_string(), None);
    assert_eq!(s, 400);
    assert!(b["error"].as_str().unwrap().contains("colour"), "{b}");
    let mut zero = spec.clone();
    zero["vcpus"] = json!(0);
    let (s, b) = create(a, &zero.to_string(), None);
    assert_eq!((s, b["kind"].as_str()), (400, Some("invalid")));
    assert!(b["error"].as_str().unwrap().contains("vcpus"));
    assert_eq!(create(r, &spec.to_string(), None).0, 403);
    assert_eq!(create(None, &spec.to_string(), None).0, 401);
    let (s, b) = create(a, &spec.to_string(), Some("create-web-1"));
    assert_eq!((s, b["replayed"].as_bool()), (201, Some(false)), "{b}");
    let (s, b) = create(a, &spec.to_string(), Some("create-web-1"));
    assert_eq!(
        (s, b["replayed"].as_bool()),
        (201, Some(true)),
        "a replayed id gets the first answer: {b}"
    );
    let (s, b) = create(a, &spec.to_string(), None);
    assert_eq!((s, b["kind"].as_str()), (409, Some("conflict")));
    spec["name"] = json!("db");
    spec["protection"] = json!("ft");
    assert_eq!(create(a, &spec.to_string(), None).0, 201);

    // Show and list: every setting readable back.
    let (s, v) = api.call("GET", "/api/v1/vms/{name}", "/api/v1/vms/db", r, None, None);
    assert_eq!(s, 200);
    assert_eq!(v["spec"]["protection"], "ft");
    assert_eq!(v["spec"]["preferred_node"], "pm1");
    assert_eq!(v["spec"]["autostart"], true);
    assert_eq!(v["spec"]["failback"], "manual");
    assert_eq!(v["spec"]["payload"]["counter_rate"], 50);
    assert_eq!(v["state"], "stopped");
    assert!(!v["reason"].as_str().unwrap().is_empty());
    assert_eq!(
        api.call(
            "GET",
            "/api/v1/vms/{name}",
            "/api/v1/vms/nope",
            r,
            None,
            None
        )
        .0,
        404
    );
    let (_, list) = api.call("GET", "/api/v1/vms", "/api/v1/vms", r, None, None);
    assert_eq!(list.as_array().unwrap().len(), 2);

    // Set: bad JSON, read-only, unknown VM, bad node, success read back.
    let set = |tok, path: &str, body: &str| {
        api.call("PATCH", "/api/v1/vms/{name}", path, tok, Some(body), None)
    };
    assert_eq!(set(a, "/api/v1/vms/db", "[").0, 400);
    assert_eq!(set(r, "/api/v1/vms/db", "{}").0, 403);
    assert_eq!(set(a, "/api/v1/vms/nope", "{}").0, 404);
    let (s, b) = set(a, "/api/v1/vms/db", r#"{"preferred_node": "pm7"}"#);
    assert_eq!(s, 400);
    assert!(b["error"].as_str().unwrap().contains("pm7"));
    let (s, _) = set(
        a,
        "/api/v1/vms/db",
        r#"{"preferred_node": "pm2", "autostart": false, "failback": "auto", "protection": "ha"}"#,
    );
    assert_eq!(s, 200);
    let (_, v) = api.call("GET", "/api/v1/vms/{name}", "/api/v1/vms/db", r, None, None);
    assert_eq!(
        (
            &v["spec"]["preferred_node"],
            &v["spec"]["autostart"],
            &v["spec"]["failback"],
            &v["spec"]["protection"]
        ),
        (&json!("pm2"), &json!(false), &json!("auto"), &json!("ha"))
    );

    // Commands on VMs: unknown VM, read-only, conflicts that say what to do.
    for op in [
        "start", "shutdown", "poweroff", "restart", "failback", "migrate",
    ] {
        let t = format!("/api/v1/vms/{{name}}/{op}");
        assert_eq!(
            api.call("POST", &t, &format!("/api/v1/vms/nope/{op}"), a, None, None)
                .0,
            404,
            "{op}"
        );
        assert_eq!(
            api.call("POST", &t, &format!("/api/v1/vms/web/{op}"), r, None, None)
                .0,
            403,
            "{op}"
        );
        assert_eq!(
            api.call(
                "POST",
                &t,
                &format!("/api/v1/vms/web/{op}"),
                None,
                None,
                None
            )
            .0,
            401,
            "{op}"
        );
    }
    let (s, b) = api.call(
        "POST",
        "/api/v1/vms/{name}/restart",
        "/api/v1/vms/web/restart",
        a,
        None,
        None,
    );
    assert_eq!(s, 409);
    assert!(
        b["error"]
            .as_str()
            .unwrap()
            .contains("twinrun vm start web"),
        "{b}"
    );
    let (s, b) = api.call(
        "POST",
        "/api/v1/vms/{name}/failback",
        "/api/v1/vms/web/failback",
        a,
        None,
        None,
    );
    assert_eq!((s, b["kind"].as_str()), (409, Some("conflict")));
    // Live migration: a stopped VM cannot move; a body naming no node of the cluster is
    // refused; the progress of a VM that is not migrating says so.
    let (s, b) = api.call(
        "POST",
        "/api/v1/vms/{name}/migrate",
        "/api/v1/vms/web/migrate",
        a,
        Some(r#"{"to": "pm2"}"#),
        None,
    );
    assert_eq!((s, b["kind"].as_str()), (409, Some("conflict")), "{b}");
    assert!(b["error"].as_str().unwrap().contains("not running"), "{b}");
    let (s, _) = api.call(
        "POST",
        "/api/v1/vms/{name}/migrate",
        "/api/v1/vms/web/migrate",
        a,
        Some(r#"{"to": 7}"#),
        None,
    );
    assert_eq!(s, 400);
    let mt = "/api/v1/vms/{name}/migration";
    let (s, b) = api.call("GET", mt, "/api/v1/vms/web/migration", r, None, None);
    assert_eq!((s, &b["active"]), (200, &json!(false)), "{b}");
    assert_eq!(
        api.call("GET", mt, "/api/v1/vms/nope/migration", r, None, None)
            .0,
        404
    );
    assert_eq!(
        api.call("GET", mt, "/api/v1/vms/web/migration", None, None, None)
            .0,
        401
    );
    // A real start: the guest runs on this node (its peer never came: the quorum gate
    // is asked after the boot grace).
    let (s, b) = api.call(
        "POST",
        "/api/v1/vms/{name}/start",
        "/api/v1/vms/web/start",
        a,
        None,
        Some("start-web-1"),
    );
    assert_eq!((s, b["message"].as_str()), (200, Some("starting")));
    let view = wait_for(
        std::time::Duration::from_secs(60),
        "web running",
        || {
            let (_, v) = api.call(
                "GET",
                "/api/v1/vms/{name}",
                "/api/v1/vms/web",
                r,
                None,
                None,
            );
            (v["state"] == "running").then_some(v)
        },
        || d.log_text(),
    );
    assert_eq!(view["vmms"][0]["role"], "solo");
    assert!(
        view["reason"].as_str().unwrap().contains("running on pm1"),
        "{view}"
    );
    let (s, b) = api.call(
        "DELETE",
        "/api/v1/vms/{name}",
        "/api/v1/vms/web",
        a,
        None,
        None,
    );
    assert_eq!(s, 409);
    assert!(
        b["error"].as_str().unwrap().contains("stop it first"),
        "{b}"
    );
    assert_eq!(
        api.call(
            "POST",
            "/api/v1/vms/{name}/restart",
            "/api/v1/vms/web/restart",
            a,
            None,
            None
        )
        .0,
        200
    );
    assert_eq!(
        api.call(
            "POST",
            "/api/v1/vms/{name}/poweroff",
            "/api/v1/vms/web/poweroff",
            a,
            None,
            None
        )
        .0,
        200
    );
    wait_for(
        std::time::Duration::from_secs(30),
        "web stopped",
        || {
            let (_, v) = api.call(
                "GET",
                "/api/v1/vms/{name}",
                "/api/v1/vms/web",
                r,
                None,
                None,
            );
            (v["state"] == "stopped" && v["vmms"].as_array().is_some_and(Vec::is_empty))
                .then_some(())
        },
        || d.log_text(),
    );
    assert_eq!(
        api.call(
            "POST",
            "/api/v1/vms/{name}/shutdown",
            "/api/v1/vms/web/shutdown",
            a,
            None,
            None
        )
        .0,
        200
    );

    // Delete: read-only, unknown, success, then gone.
    assert_eq!(
        api.call(
            "DELETE",
            "/api/v1/vms/{name}",
            "/api/v1/vms/web",
            r,
            None,
            None
        )
        .0,
        403
    );
    assert_eq!(
        api.call(
            "DELETE",
            "/api/v1/vms/{name}",
            "/api/v1/vms/nope",
            a,
            None,
            None
        )
        .0,
        404
    );
    assert_eq!(
        api.call(
            "DELETE",
            "/api/v1/vms/{name}",
            "/api/v1/vms/web",
            a,
            None,
            None
        )
        .0,
        200
    );
    assert_eq!(
        api.call(
            "GET",
            "/api/v1/vms/{name}",
            "/api/v1/vms/web",
            r,
            None,
            None
        )
        .0,
        404
    );
    assert!(
        !plan.node_dir(0).join("state/vms/web").exists(),
        "a deleted VM's files are removed"
    );

    // Events: the log says what happened and why.
    let (s, ev) = api.call(
        "GET",
        "/api/v1/events",
        "/api/v1/events?vm=web&limit=500",
        r,
        None,
        None,
    );
    assert_eq!(s, 200);
    let text: Vec<&str> = ev
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["message"].as_str())
        .collect();
    assert!(
        text.iter()
            .any(|m| m.contains("quorum granted to run alone")),
        "{text:?}"
    );
    assert!(
        text.iter().any(|m| m.contains("command start-web-1 start")),
        "{text:?}"
    );
    assert_eq!(
        api.call(
            "GET",
            "/api/v1/events",
            "/api/v1/events?limit=x",
            r,
            None,
            None
        )
        .0,
        400
    );
    assert_eq!(
        api.call("GET", "/api/v1/events", "/api/v1/events", None, None, None)
            .0,
        401
    );

    // Every documented operation was exercised.
    let checked = api.checked.borrow();
    for (path, ops) in api.doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            if path.ends_with("openapi.json") {
                continue;
            }
            let m = method.to_uppercase();
            assert!(
                checked
                    .iter()
                    .any(|c| c.starts_with(&format!("{m} {path} "))),
                "{m} {path} untested"
            );
        }
    }
}

#[test]
fn cli_json_output_and_exit_codes() {
    let plan = ClusterPlan::new();
    let _reaper = VmmReaper(&plan);
    let _d = Daemon::start(&plan, 0);
    let tok = plan.dir.path().join("admin.token");
    std::fs::write(&tok, ADMIN).unwrap();
    let ro = plan.dir.path().join("ro.token");
    std::fs::write(&ro, READER).unwrap();
    let api = format!("http://{}", plan.api[0]);
    let cli = |args: &[&str], token: &std::path::Path| {
        let out = Command::new(twinrun_bin())
            .args(args)
            .args(["--api", &api, "--token-file"])
            .arg(token)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let spec = plan.dir.path().join("web.toml");
    std::fs::write(&spec, spec_toml("web", "ha", "pm1", &["counter"], false)).unwrap();
    let (code, out, err) = cli(&["vm", "create", spec.to_str().unwrap(), "--json"], &tok);
    assert_eq!(code, Some(0), "{err}");
    let v: Value = serde_json::from_str(&out).expect("--json prints one JSON value");
    assert_eq!(v["op"], "create");
    let (code, out, _) = cli(&["vm", "list", "--json"], &tok);
    assert_eq!(code, Some(0));
    let list: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list[0]["spec"]["name"], "web");
    let (code, out, _) = cli(&["vm", "show", "web"], &ro);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("protection: ha") && out.contains("why:"),
        "{out}"
    );
    let (code, out, _) = cli(&["node", "list", "--json"], &ro);
    assert_eq!(code, Some(0));
    assert_eq!(
        serde_json::from_str::<Value>(&out)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let (code, out, _) = cli(&["node", "show", "pm2", "--json"], &ro);
    assert_eq!(code, Some(0));
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["name"], "pm2");
    // Exit codes: not found 3, conflict 4, auth 5, bad input 2, unreachable 6.
    let (code, out, err) = cli(&["vm", "show", "nope", "--json"], &ro);
    assert_eq!(code, Some(3), "{err}");
    assert!(serde_json::from_str::<Value>(&out).unwrap()["error"]
        .as_str()
        .unwrap()
        .contains("nope"));
    assert_eq!(
        cli(&["vm", "create", spec.to_str().unwrap()], &tok).0,
        Some(4)
    );
    let (code, _, err) = cli(&["vm", "start", "web"], &ro);
    assert_eq!(code, Some(5));
    assert!(err.contains("read-only"), "{err}");
    assert_eq!(cli(&["vm", "set", "web"], &tok).0, Some(2));
    std::fs::write(&spec, "name = \"x\"\nvcpus = \"two\"\n").unwrap();
    let (code, _, err) = cli(&["vm", "create", spec.to_str().unwrap()], &tok);
    assert_eq!(code, Some(2));
    assert!(err.contains(&format!("{}:2:", spec.display())), "{err}");
    let (code, out, _) = cli(
        &[
            "vm",
            "set",
            "web",
            "--autostart",
            "false",
            "--failback",
            "auto",
            "--json",
        ],
        &tok,
    );
    assert_eq!(code, Some(0));
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["op"], "set");
    let (code, _, _) = cli(&["vm", "delete", "web", "--command-id", "del-1"], &tok);
    assert_eq!(code, Some(0));
    let (code, out, _) = cli(&["vm", "delete", "web", "--command-id", "del-1"], &tok);
    assert_eq!(
        code,
        Some(0),
        "a repeated command id is answered, not run again"
    );
    assert!(out.contains("earlier identical command"), "{out}");
    let out = Command::new(twinrun_bin())
        .args(["vm", "list", "--api", "http://127.0.0.1:1", "--token-file"])
        .arg(&tok)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(6));
}

#[test]
fn the_api_over_tls() {
    let mut plan = ClusterPlan::new();
    // A self-signed certificate for the API's loopback address.
    let (cert, key) = (
        plan.dir.path().join("api.crt"),
        plan.dir.path().join("api.key"),
    );
    let ip = plan.api[0].ip().to_string();
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=twinrund",
        ])
        .arg("-addext")
        .arg(format!("subjectAltName=IP:{ip}"))
        // An end-entity certificate (webpki refuses a CA certificate as the server's).
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl is installed (Debian package openssl)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    plan.tls = Some((cert.clone(), key.clone()));
    let d = Daemon::start(&plan, 0);
    let url = format!("https://{}", plan.api[0]);
    // A client that trusts the certificate talks; the token still decides.
    let c = Client::with_ca(&url, READER, &cert).unwrap();
    assert_eq!(c.nodes().unwrap().len(), 2, "{}", d.log_text());
    let admin = Client::with_ca(&url, ADMIN, &cert).unwrap();
    admin
        .create(
            &spec("web", "unprotected", "pm1", &["counter"], false),
            None,
        )
        .unwrap();
    assert!(matches!(
        c.create(&spec("x", "unprotected", "pm1", &["counter"], false), None),
        Err(twinrund::client::ClientError::Api { status: 403, .. })
    ));
    // One that does not trust it, and plain HTTP on the TLS port, get nowhere.
    let e = Client::new(&url, READER).nodes().unwrap_err();
    assert!(
        matches!(e, twinrund::client::ClientError::Unreachable { .. }),
        "{e}"
    );
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
    assert!(Client::new(&format!("http://{}", plan.api[0]), READER)
        .nodes()
        .is_err());
    // The CLI: --ca-file, and a clear error without it.
    let tok = plan.dir.path().join("ro.token");
    std::fs::write(&tok, READER).unwrap();
    let run = |ca: Option<&std::path::Path>| {
        let mut cmd = Command::new(twinrun_bin());
        cmd.args(["vm", "list", "--json", "--api", &url, "--token-file"])
            .arg(&tok);
        if let Some(ca) = ca {
            cmd.arg("--ca-file").arg(ca);
        }
        cmd.output().unwrap()
    };
    let ok = run(Some(&cert));
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&ok.stdout).unwrap()[0]["spec"]["name"],
        "web"
    );
    assert_eq!(run(None).status.code(), Some(6));
    // A certificate and key that do not fit are a config error (exit 2).
    std::fs::write(
        &key,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let out = Command::new(twinrund_bin())
        .args(["--check-config", "--config"])
        .arg(plan.config_path(0))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("TLS"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `POST /api/v1/nodes/{name}/workon|finalize`: success, replay and every error status.
fn maintenance_endpoints(api: &Api, a: Option<&str>, r: Option<&str>) {
    const WORKON: &str = "/api/v1/nodes/{name}/workon";
    const FINALIZE: &str = "/api/v1/nodes/{name}/finalize";
    let (s, b) = api.call("POST", WORKON, "/api/v1/nodes/pm9/workon", a, None, None);
    assert_eq!((s, b["kind"].as_str()), (400, Some("invalid")), "{b}");
    assert!(b["error"].as_str().unwrap().contains("pm1, pm2"), "{b}");
    assert_eq!(
        api.call("POST", WORKON, "/api/v1/nodes/pm1/workon", None, None, None)
            .0,
        401
    );
    assert_eq!(
        api.call("POST", WORKON, "/api/v1/nodes/pm1/workon", r, None, None)
            .0,
        403
    );
    let (s, b) = api.call(
        "POST",
        WORKON,
        "/api/v1/nodes/pm1/workon",
        a,
        None,
        Some("mw-1"),
    );
    assert_eq!(s, 200, "{b}");
    assert!(
        b["message"]
            .as_str()
            .unwrap()
            .contains("pm1 is in maintenance"),
        "{b}"
    );
    let (s, b) = api.call(
        "POST",
        WORKON,
        "/api/v1/nodes/pm1/workon",
        a,
        None,
        Some("mw-1"),
    );
    assert_eq!((s, b["replayed"].as_bool()), (200, Some(true)), "{b}");
    let (_, n) = api.call(
        "GET",
        "/api/v1/nodes/{name}",
        "/api/v1/nodes/pm1",
        r,
        None,
        None,
    );
    assert!(n["maintenance"].as_str().is_some(), "{n}");
    let (s, b) = api.call("POST", WORKON, "/api/v1/nodes/pm2/workon", a, None, None);
    assert_eq!((s, b["kind"].as_str()), (409, Some("conflict")), "{b}");
    assert!(
        b["error"]
            .as_str()
            .unwrap()
            .contains("both nodes in maintenance"),
        "{b}"
    );
    assert_eq!(
        api.call(
            "POST",
            FINALIZE,
            "/api/v1/nodes/pm1/finalize",
            None,
            None,
            None
        )
        .0,
        401
    );
    let (s, b) = api.call(
        "POST",
        FINALIZE,
        "/api/v1/nodes/pm1/finalize",
        a,
        None,
        None,
    );
    assert_eq!(s, 200, "{b}");
    assert!(
        b["message"].as_str().unwrap().contains("left maintenance"),
        "{b}"
    );
    let (_, n) = api.call(
        "GET",
        "/api/v1/nodes/{name}",
        "/api/v1/nodes/pm1",
        r,
        None,
        None,
    );
    assert!(n["maintenance"].is_null(), "{n}");
    let (s, b) = api.call(
        "POST",
        FINALIZE,
        "/api/v1/nodes/pm2/finalize",
        a,
        None,
        None,
    );
    assert_eq!(s, 200, "{b}");
    assert!(
        b["message"]
            .as_str()
            .unwrap()
            .contains("not in maintenance"),
        "{b}"
    );
}

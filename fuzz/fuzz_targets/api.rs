//! The control API's routes as any client might call them: a method, a path and a body from
//! the input, against a block device's services, many requests in a row. Checks: no panic;
//! every answer is a status between 200 and 499 with a JSON body (or the metrics text); a
//! request answered 4xx changes no rule or limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pvkit_fuzz::Input;
use pvkit_host_devices::services::api::route;
use pvkit_host_devices::services::{BLK, DeviceServices, ServiceArgs};

const METHODS: [&str; 5] = ["GET", "PUT", "DELETE", "POST", "PATCH"];
const PATHS: [&str; 6] = ["/stats", "/metrics", "/faults", "/limits", "/faults?x=1", "/other"];

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let services = DeviceServices::new(BLK, 2, &ServiceArgs::default()).expect("services");
    for _ in 0..8 {
        if input.rest_len() == 0 {
            break;
        }
        let method = METHODS[usize::from(input.byte()) % METHODS.len()];
        let path = PATHS[usize::from(input.byte()) % PATHS.len()];
        let len = usize::from(input.u16()) % 2048;
        let body: Vec<u8> = (0..len.min(input.rest_len())).map(|_| input.byte()).collect();
        let metrics_only = input.byte() & 1 == 1;
        let before = (services.faults.to_json(), services.limits.to_json());
        let reply = route(&services, method, path, &body, metrics_only);
        assert!((200..500).contains(&reply.status), "{method} {path}: {}", reply.status);
        if reply.content_type.starts_with("application/json") {
            assert!(serde_json::from_str::<serde_json::Value>(&reply.body).is_ok(), "{}", reply.body);
        }
        if reply.status >= 400 {
            let faults_after = services.faults.to_json();
            assert_eq!(before.0["rules"].as_array().map(Vec::len), faults_after["rules"].as_array().map(Vec::len));
            assert_eq!(before.1["limits"], services.limits.to_json()["limits"]);
        }
    }
});

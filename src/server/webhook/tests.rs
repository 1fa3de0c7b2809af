use super::*;

fn headers(pairs: &[(&str, &str)]) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    for (k, v) in pairs {
        h.append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), http::HeaderValue::from_str(v).unwrap());
    }
    h
}

fn text(v: Option<&http::HeaderValue>) -> Option<&str> {
    v.map(|v| v.to_str().unwrap())
}

#[test]
fn the_one_walk_finds_what_get_finds() {
    let auth = http::HeaderName::from_static("x-webio-token");
    let cases: &[&[(&str, &str)]] = &[
        &[],
        &[("host", "a"), ("content-type", "application/json")],
        &[("X-Webio-Token", "t1"), ("Content-Length", "12"), ("X-Request-Id", "r1"), ("Traceparent", "tp")],
        // A repeated name: the first value, as `get` gives, wherever the others are.
        &[("x-webio-token", "first"), ("host", "a"), ("x-webio-token", "second"), ("x-request-id", "r")],
        &[("traceparent", "one"), ("traceparent", "two"), ("content-length", "1"), ("content-length", "2")],
        // Not the configured header: another token header is not read.
        &[("authorization", "Bearer x"), ("x-request-id", "")],
    ];
    for pairs in cases {
        let h = headers(pairs);
        let got = Heads::of(&h, &auth);
        assert_eq!(text(got.token), text(h.get(&auth)), "{pairs:?}");
        assert_eq!(text(got.content_length), text(h.get(http::header::CONTENT_LENGTH)), "{pairs:?}");
        assert_eq!(text(got.request_id), text(h.get("x-request-id")), "{pairs:?}");
        assert_eq!(text(got.traceparent), text(h.get(TRACEPARENT)), "{pairs:?}");
    }
    // The configured header may be one of the others' names too.
    let h = headers(&[("authorization", "a"), ("content-length", "3")]);
    assert_eq!(text(Heads::of(&h, &http::header::AUTHORIZATION).token), Some("a"));
}

#[test]
fn the_request_id_is_the_clients_when_short_and_text() {
    let long = "r".repeat(65);
    let h = headers(&[("x-request-id", "abc")]);
    assert_eq!(RequestId::of(h.get("x-request-id")).to_string(), "abc");
    let h = headers(&[("x-request-id", &long)]);
    let id = RequestId::of(h.get("x-request-id"));
    assert_eq!(id.to_string(), format!("{:x}", id.seq));
    let mut h = http::HeaderMap::new();
    h.insert("x-request-id", http::HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap());
    let id = RequestId::of(h.get("x-request-id"));
    assert_eq!(id.to_string(), format!("{:x}", id.seq));
}

async fn body_of(resp: Response<Body>) -> (StatusCode, Option<String>, Vec<u8>) {
    let status = resp.status();
    let ct = resp.headers().get(http::header::CONTENT_TYPE).map(|v| v.to_str().unwrap().to_owned());
    let body = resp.into_body().collect().await.unwrap().to_bytes().to_vec();
    (status, ct, body)
}

#[tokio::test]
async fn the_answers_are_the_json_they_were() {
    let id = "0123456789abcdef0123456789abcdef";
    for routes in [0usize, 1, 9, 10, 12345, usize::MAX] {
        let (status, ct, body) = body_of(Answer::new(id).accepted(routes)).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        assert_eq!(ct.as_deref(), Some("application/json"));
        let want = serde_json::json!({"status": "accepted", "id": id, "routes": routes});
        assert_eq!(serde_json::from_slice::<serde_json::Value>(&body).unwrap(), want);
        assert_eq!(body, format!(r#"{{"status":"accepted","id":"{id}","routes":{routes}}}"#).into_bytes());
    }
    let (status, _, body) = body_of(Answer::new(id).duplicate()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, format!(r#"{{"status":"duplicate","id":"{id}"}}"#).into_bytes());
    // An id of another length (none is made today) is answered as it is.
    let (_, _, body) = body_of(Answer::new("short").accepted(2)).await;
    assert_eq!(body, br#"{"status":"accepted","id":"short","routes":2}"#.to_vec());
    assert_eq!(Answer::new(id).id(), id);
}

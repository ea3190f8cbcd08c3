//! `WWW-Authenticate` challenges (RFC 7235) as registries send them:
//! `Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="..."` or
//! `Basic realm="..."`.

use std::collections::HashMap;

/// One authentication challenge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Challenge {
    /// Send a username and password with every request.
    Basic,
    /// Fetch a token from `realm` and send it as `Authorization: Bearer`.
    Bearer {
        /// The token service URL.
        realm: String,
        /// The `service` parameter to pass to the token service.
        service: Option<String>,
        /// The scope the registry says the request needs, if it says.
        scope: Option<String>,
    },
}

/// Parses every challenge in the `WWW-Authenticate` header values; unknown schemes are skipped.
pub fn parse_challenges<'a>(values: impl IntoIterator<Item = &'a str>) -> Vec<Challenge> {
    let mut out = Vec::new();
    for value in values {
        for (scheme, params) in split_challenges(value) {
            match scheme.to_ascii_lowercase().as_str() {
                "basic" => out.push(Challenge::Basic),
                "bearer" => {
                    if let Some(realm) = params.get("realm") {
                        out.push(Challenge::Bearer {
                            realm: realm.clone(),
                            service: params.get("service").cloned(),
                            scope: params.get("scope").cloned(),
                        });
                    }
                }
                _ => {}
            }
        }
    }
    out
}

/// Splits a header value into (scheme, params) pairs. Parameters are `name=token` or
/// `name="quoted string"`; a new challenge starts at a bare token followed by a space.
fn split_challenges(value: &str) -> Vec<(String, HashMap<String, String>)> {
    let mut challenges: Vec<(String, HashMap<String, String>)> = Vec::new();
    let bytes = value.as_bytes();
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while *i < bytes.len() && (bytes[*i] == b' ' || bytes[*i] == b'\t' || bytes[*i] == b',') {
            *i += 1;
        }
    };
    loop {
        skip_ws(&mut i);
        if i >= bytes.len() {
            break;
        }
        let start = i;
        while i < bytes.len() && !matches!(bytes[i], b' ' | b'\t' | b',' | b'=') {
            i += 1;
        }
        let token = value[start..i].to_string();
        if i < bytes.len() && bytes[i] == b'=' {
            // A parameter of the current challenge.
            i += 1;
            let param_value = if i < bytes.len() && bytes[i] == b'"' {
                i += 1;
                let mut text = String::new();
                while i < bytes.len() && bytes[i] != b'"' {
                    if bytes[i] == b'\\' && i + 1 < bytes.len() {
                        i += 1;
                    }
                    let ch = value[i..].chars().next().unwrap_or(' ');
                    text.push(ch);
                    i += ch.len_utf8();
                }
                i += 1; // closing quote
                text
            } else {
                let start = i;
                while i < bytes.len() && !matches!(bytes[i], b' ' | b'\t' | b',') {
                    i += 1;
                }
                value[start..i].to_string()
            };
            if let Some((_, params)) = challenges.last_mut() {
                params.insert(token.to_ascii_lowercase(), param_value);
            }
        } else {
            challenges.push((token, HashMap::new()));
        }
    }
    challenges
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub_bearer() {
        let c = parse_challenges([
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/debian:pull""#,
        ]);
        assert_eq!(
            c,
            vec![Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/debian:pull".into()),
            }]
        );
    }

    #[test]
    fn several_challenges_and_odd_spacing() {
        let c = parse_challenges([
            r#"Basic realm="Registry Realm", Bearer realm=https://ghcr.io/token,service=ghcr.io"#,
            "Negotiate",
        ]);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0], Challenge::Basic);
        assert!(
            matches!(&c[1], Challenge::Bearer { realm, service: Some(s), scope: None }
            if realm == "https://ghcr.io/token" && s == "ghcr.io")
        );
    }

    #[test]
    fn quoted_commas_and_escapes() {
        let c = parse_challenges([
            r#"Bearer realm="http://h/t",scope="repository:a:pull,push repository:b:pull",error="insufficient_scope""#,
        ]);
        assert!(matches!(&c[0], Challenge::Bearer { scope: Some(s), .. }
            if s == "repository:a:pull,push repository:b:pull"));
        assert!(
            parse_challenges([r#"Bearer service="x""#]).is_empty(),
            "no realm, no challenge"
        );
    }
}

//! Checks real answers against `docs/openapi.json`: finds the schema of a
//! (method, path, status) and validates a JSON value against it. The
//! validator covers the part of JSON Schema the document uses: `$ref`,
//! `type` (with OpenAPI 3.0's `nullable`), `enum`, `properties`,
//! `required`, `additionalProperties`, `items`, `oneOf` and `anyOf`.

use std::path::PathBuf;

use serde_json::Value;

/// The checked-in OpenAPI document.
pub struct Doc {
    pub doc: Value,
}

impl Doc {
    pub fn path() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json")
    }

    pub fn load() -> Self {
        let text = std::fs::read_to_string(Self::path()).expect("reading docs/openapi.json");
        Self {
            doc: serde_json::from_str(&text).expect("docs/openapi.json is JSON"),
        }
    }

    /// The operation for `method` on the documented `path` template.
    pub fn operation(&self, method: &str, path: &str) -> Option<&Value> {
        self.doc["paths"]
            .get(path)?
            .get(method.to_ascii_lowercase())
    }

    /// Validates `body` as the answer `status` of `method path` with
    /// `content_type` (`application/json` for JSON, `text/event-stream` event
    /// payloads are checked with [`Doc::validate_named`]).
    pub fn check(&self, method: &str, path: &str, status: u16, body: &Value) -> Result<(), String> {
        let op = self
            .operation(method, path)
            .ok_or_else(|| format!("{method} {path} is not documented"))?;
        let resp = op["responses"]
            .get(status.to_string())
            .or_else(|| op["responses"].get("default"))
            .ok_or_else(|| format!("{method} {path}: status {status} is not documented"))?;
        let resp = self.deref(resp);
        let Some(schema) = resp["content"]["application/json"].get("schema") else {
            if body.is_null() {
                return Ok(());
            }
            return Err(format!(
                "{method} {path} {status}: no JSON schema documented"
            ));
        };
        self.validate(schema, body, "$")
    }

    /// Validates `v` against `#/components/schemas/<name>`.
    pub fn validate_named(&self, name: &str, v: &Value) -> Result<(), String> {
        let schema = &self.doc["components"]["schemas"][name];
        if schema.is_null() {
            return Err(format!("schema {name} is not in the document"));
        }
        self.validate(schema, v, "$")
    }

    fn deref<'a>(&'a self, mut s: &'a Value) -> &'a Value {
        while let Some(r) = s.get("$ref").and_then(Value::as_str) {
            let mut cur = &self.doc;
            for part in r.trim_start_matches("#/").split('/') {
                cur = &cur[part];
            }
            s = cur;
        }
        s
    }

    pub fn validate(&self, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
        let s = self.deref(schema);
        if v.is_null() && s.get("nullable").and_then(Value::as_bool) == Some(true) {
            return Ok(());
        }
        if let Some(all) = s
            .get("oneOf")
            .or_else(|| s.get("anyOf"))
            .and_then(Value::as_array)
        {
            let errors: Vec<String> = all
                .iter()
                .filter_map(|alt| self.validate(alt, v, at).err())
                .collect();
            if errors.len() == all.len() {
                return Err(format!(
                    "{at}: matches no alternative: {}",
                    errors.join("; ")
                ));
            }
            return Ok(());
        }
        if let Some(t) = s.get("type").and_then(Value::as_str) {
            let ok = match t {
                "object" => v.is_object(),
                "array" => v.is_array(),
                "string" => v.is_string(),
                "integer" => v.is_i64() || v.is_u64(),
                "number" => v.is_number(),
                "boolean" => v.is_boolean(),
                other => return Err(format!("{at}: schema type {other} unsupported")),
            };
            if !ok {
                return Err(format!("{at}: expected {t}, got {v}"));
            }
        }
        if let Some(e) = s.get("enum").and_then(Value::as_array) {
            if !e.contains(v) {
                return Err(format!("{at}: {v} is not one of {e:?}"));
            }
        }
        if let Some(o) = v.as_object() {
            let props = s.get("properties").and_then(Value::as_object);
            if let Some(req) = s.get("required").and_then(Value::as_array) {
                for r in req.iter().filter_map(Value::as_str) {
                    if !o.contains_key(r) {
                        return Err(format!("{at}: required property {r} is missing"));
                    }
                }
            }
            for (k, val) in o {
                let sub = format!("{at}.{k}");
                match props.and_then(|p| p.get(k)) {
                    Some(ps) => self.validate(ps, val, &sub)?,
                    None => match s.get("additionalProperties") {
                        Some(Value::Bool(false)) => {
                            return Err(format!("{at}: property {k} is not documented"))
                        }
                        Some(ap @ Value::Object(_)) => self.validate(ap, val, &sub)?,
                        _ => {}
                    },
                }
            }
        }
        if let (Some(items), Some(a)) = (s.get("items"), v.as_array()) {
            for (i, x) in a.iter().enumerate() {
                self.validate(items, x, &format!("{at}[{i}]"))?;
            }
        }
        Ok(())
    }
}

//! `Parallel` and `Map` states: their branches or iterations are runs of their own, started
//! once the state has written which they are, and gathered in order.

use serde_json::{Value, json};

use super::*;

impl Engine {
    /// A `Parallel` or `Map` state: its branches or iterations are runs of their own (ids
    /// `<run>.<seq>.<i>`, durable and resumed like any run), started once the state has
    /// written which they are, and gathered in order.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn children(
        &self,
        run_id: &str,
        run: &Run,
        context: &Value,
        cur: &Cursor,
        scope: &Value,
        state: &crate::definition::State,
        raw: &Value,
        io: &Io,
        next: &Next,
        live: &Live,
        seq: u64,
    ) -> Step {
        let Some((request_id, _, body, _)) = cur.pending.clone() else {
            // Which children, on which inputs: written before any starts.
            let plan = match self.plan(cur, scope, state, raw, io) {
                Ok(p) => p,
                Err(f) => return Step::Fail(f),
            };
            return Step::Events(vec![Event::ActionStarted {
                state: cur.state.clone(),
                request_id: format!("{run_id}.{seq}"),
                url: CHILDREN.into(),
                body: plan,
                at_ms: crate::time::now_ms(),
            }]);
        };
        let inputs = body["inputs"].as_array().cloned().unwrap_or_default();
        let definitions = body["definitions"].as_array().cloned().unwrap_or_default();
        let limit = body["max_concurrency"].as_u64().unwrap_or(0) as usize;
        let ids: Vec<String> = (0..inputs.len())
            .map(|i| format!("{request_id}.{i}"))
            .collect();
        let mut changes = self.changes();
        loop {
            let mut outputs = Vec::with_capacity(ids.len());
            let mut running = 0usize;
            let mut failed = None;
            for (i, id) in ids.iter().enumerate() {
                let child = match self.get(id) {
                    Ok(c) => c,
                    Err(e) => return Step::Fail(Failure::runtime(e)),
                };
                match child {
                    Some(c) if c.status == RunStatus::Succeeded => {
                        outputs.push(c.details["output"].clone())
                    }
                    Some(c) if c.status.is_final() => {
                        failed.get_or_insert((id.clone(), c.details.clone()));
                    }
                    Some(_) => running += 1,
                    None if limit == 0 || running < limit => {
                        let def = definitions
                            .get(i)
                            .or_else(|| definitions.first())
                            .cloned()
                            .unwrap_or(Value::Null);
                        let mut ctx = context.clone();
                        if let Some(item) = body["items"].get(i) {
                            ctx["map_item"] = json!({"index": i, "value": item});
                        }
                        if let Err(e) = self.start_with(
                            id,
                            &run.flow_id,
                            &def,
                            inputs[i].clone(),
                            &run.user,
                            run.label.clone(),
                            ctx,
                            Some(run_id.to_string()),
                        ) {
                            return Step::Fail(Failure::runtime(e));
                        }
                        running += 1;
                    }
                    None => {}
                }
            }
            if let Some((id, details)) = failed {
                // The first failure fails the state; the others stop.
                for other in &ids {
                    let _ = self.cancel(other);
                }
                let error = details["Error"].as_str().unwrap_or("States.BranchFailed");
                return Step::Fail(Failure {
                    error: error.to_string(),
                    cause: format!(
                        "{id} failed: {}",
                        details["Cause"].as_str().unwrap_or("cancelled")
                    ),
                    details,
                });
            }
            if outputs.len() == ids.len() {
                return match output_of(io, &cur.doc, Value::Array(outputs)) {
                    Ok(out) => Step::Events(vec![Event::StateExited {
                        state: cur.state.clone(),
                        output: out,
                        next: match next {
                            Next::To(s) => Some(s.clone()),
                            Next::End => None,
                        },
                        caught: None,
                    }]),
                    Err(f) => Step::Fail(f),
                };
            }
            if live.cancel.load(std::sync::atomic::Ordering::SeqCst) {
                for id in &ids {
                    let _ = self.cancel(id);
                }
                return Step::Again;
            }
            tokio::select! {
                _ = changes.recv() => {}
                () = live.wake.notified() => {}
                () = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    }

    /// The children of a `Parallel` or `Map` state: their definitions and inputs.
    pub(super) fn plan(
        &self,
        cur: &Cursor,
        scope: &Value,
        state: &crate::definition::State,
        raw: &Value,
        io: &Io,
    ) -> Result<Value, Failure> {
        let selected = match &io.input_path {
            Some(p) => p.select(scope).map_err(Failure::runtime)?,
            None => scope.clone(),
        };
        match &state.kind {
            Kind::Parallel { .. } => {
                let input = match &io.parameters {
                    Some(t) => t.render(&selected).map_err(Failure::runtime)?,
                    None => strip_context(selected),
                };
                let branches = raw["Branches"].as_array().cloned().unwrap_or_default();
                Ok(json!({
                    "definitions": branches,
                    "inputs": vec![input; branches.len()],
                }))
            }
            Kind::Map {
                items_path,
                max_concurrency,
                ..
            } => {
                let items = match items_path.select(&selected).map_err(Failure::runtime)? {
                    Value::Array(items) => items,
                    other => {
                        return Err(Failure::runtime(format!(
                            "state `{}`: ItemsPath `{}` selects {other}, not a list",
                            cur.state,
                            items_path.as_str()
                        )));
                    }
                };
                if items.len() > MAX_ITEMS {
                    return Err(Failure::runtime(format!(
                        "state `{}`: {} items, more than a Map runs ({MAX_ITEMS})",
                        cur.state,
                        items.len()
                    )));
                }
                let mut inputs = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    inputs.push(match &io.parameters {
                        Some(t) => {
                            let mut scope = selected.clone();
                            if let Value::Object(m) = &mut scope {
                                let mut ctx = m.get("_context").cloned().unwrap_or(json!({}));
                                ctx["map_item"] = json!({"index": i, "value": item});
                                m.insert("_context".into(), ctx);
                            }
                            t.render(&scope).map_err(Failure::runtime)?
                        }
                        None => item.clone(),
                    });
                }
                let iterator = if raw.get("ItemProcessor").is_some() {
                    raw["ItemProcessor"].clone()
                } else {
                    raw["Iterator"].clone()
                };
                Ok(json!({
                    "definitions": [iterator],
                    "inputs": inputs,
                    "items": items,
                    "max_concurrency": max_concurrency,
                }))
            }
            _ => Err(Failure::runtime("not a Parallel or Map state")),
        }
    }
}

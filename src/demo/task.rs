//! The demo's synthetic task: four functions (weather, timer, currency conversion, restaurant
//! search) and queries from templates whose arguments must be copied from the query (city,
//! unit, currency, cuisine, amount) or derived from it (hours -> minutes). Training and
//! held-out queries are disjoint; SFT answers are noisy (a fraction carries one wrong argument),
//! which teaches the format but leaves the argument choice uncertain for GRPO to fix.

use crate::data::{Message, Sample};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use std::collections::HashSet;

const CITIES: [&str; 10] = [
    "Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Delhi", "Berlin", "Madrid", "Seoul", "Quito",
];
const UNITS: [&str; 2] = ["celsius", "fahrenheit"];
const CURRENCIES: [&str; 5] = ["USD", "EUR", "GBP", "JPY", "CHF"];
const CUISINES: [&str; 5] = ["thai", "italian", "mexican", "indian", "greek"];

/// The demo's tool schemas.
pub fn demo_tools() -> Vec<Value> {
    vec![
        json!({"name": "get_weather", "description": "Current weather in a city.",
               "parameters": {"type": "object", "properties": {
                   "city": {"type": "string", "description": "City name"},
                   "unit": {"type": "string", "description": "celsius or fahrenheit"}},
                   "required": ["city", "unit"]}}),
        json!({"name": "set_timer", "description": "Start a countdown timer.",
               "parameters": {"type": "object", "properties": {
                   "minutes": {"type": "integer", "description": "Duration in minutes"}},
                   "required": ["minutes"]}}),
        json!({"name": "convert_currency", "description": "Convert an amount of money.",
               "parameters": {"type": "object", "properties": {
                   "amount": {"type": "integer", "description": "Amount to convert"},
                   "from": {"type": "string", "description": "Currency code to convert from"},
                   "to": {"type": "string", "description": "Currency code to convert to"}},
                   "required": ["amount", "from", "to"]}}),
        json!({"name": "find_restaurant", "description": "Find a restaurant.",
               "parameters": {"type": "object", "properties": {
                   "city": {"type": "string", "description": "City name"},
                   "cuisine": {"type": "string", "description": "Kind of food"}},
                   "required": ["city", "cuisine"]}}),
    ]
}

/// The demo's system prompt: the Tool-N1 system prompt for [`demo_tools`].
pub fn demo_system_prompt() -> String {
    crate::data::tooln1_system_prompt("", &demo_tools(), false)
}

/// One task instance: a query and its correct call.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskItem {
    pub query: String,
    pub name: String,
    pub arguments: serde_json::Map<String, Value>,
}

fn pick<'a>(rng: &mut ChaCha8Rng, xs: &[&'a str]) -> &'a str {
    xs[rng.random_range(0..xs.len())]
}

fn pick_other<'a>(rng: &mut ChaCha8Rng, xs: &[&'a str], not: &str) -> &'a str {
    loop {
        let x = pick(rng, xs);
        if x != not {
            return x;
        }
    }
}

/// Draw one task instance.
pub fn draw_task(rng: &mut ChaCha8Rng) -> TaskItem {
    let mut args = serde_json::Map::new();
    let (query, name) = match rng.random_range(0..4) {
        0 => {
            let city = pick(rng, &CITIES);
            let unit = pick(rng, &UNITS);
            args.insert("city".into(), json!(city));
            args.insert("unit".into(), json!(unit));
            let q = match rng.random_range(0..3) {
                0 => format!("What is the weather in {city} in {unit}?"),
                1 => format!("How warm is it in {city}? Use {unit}."),
                _ => format!("Give me the {unit} temperature for {city}."),
            };
            (q, "get_weather")
        }
        1 => {
            let q = match rng.random_range(0..4) {
                0 | 1 => {
                    let m = 5 * rng.random_range(1..=18);
                    args.insert("minutes".into(), json!(m));
                    if rng.random_bool(0.5) {
                        format!("Set a timer for {m} minutes.")
                    } else {
                        format!("Start a {m} minute timer.")
                    }
                }
                _ => {
                    let h = rng.random_range(1..=5);
                    args.insert("minutes".into(), json!(60 * h));
                    let s = if h == 1 { "" } else { "s" };
                    if rng.random_bool(0.5) {
                        format!("Set a timer for {h} hour{s}.")
                    } else {
                        format!("Remind me in {h} hour{s}.")
                    }
                }
            };
            (q, "set_timer")
        }
        2 => {
            let amount = rng.random_range(1..=99);
            let from = pick(rng, &CURRENCIES);
            let to = pick_other(rng, &CURRENCIES, from);
            args.insert("amount".into(), json!(amount));
            args.insert("from".into(), json!(from));
            args.insert("to".into(), json!(to));
            let q = if rng.random_bool(0.5) {
                format!("Convert {amount} {from} to {to}.")
            } else {
                format!("How much is {amount} {from} in {to}?")
            };
            (q, "convert_currency")
        }
        _ => {
            let city = pick(rng, &CITIES);
            let cuisine = pick(rng, &CUISINES);
            args.insert("city".into(), json!(city));
            args.insert("cuisine".into(), json!(cuisine));
            let q = if rng.random_bool(0.5) {
                format!("Find a {cuisine} restaurant in {city}.")
            } else {
                format!("I want {cuisine} food in {city}.")
            };
            (q, "find_restaurant")
        }
    };
    TaskItem {
        query,
        name: name.to_string(),
        arguments: args,
    }
}

/// A copy of `item`'s arguments with one argument replaced by a plausible wrong value.
pub fn corrupt(rng: &mut ChaCha8Rng, item: &TaskItem) -> serde_json::Map<String, Value> {
    let mut a = item.arguments.clone();
    let keys: Vec<String> = a.keys().cloned().collect();
    let k = keys[rng.random_range(0..keys.len())].clone();
    let cur = a[&k].clone();
    let new = match k.as_str() {
        "city" => json!(pick_other(rng, &CITIES, cur.as_str().unwrap_or(""))),
        "unit" => json!(pick_other(rng, &UNITS, cur.as_str().unwrap_or(""))),
        "cuisine" => json!(pick_other(rng, &CUISINES, cur.as_str().unwrap_or(""))),
        "from" | "to" => json!(pick_other(rng, &CURRENCIES, cur.as_str().unwrap_or(""))),
        "minutes" => {
            let m = cur.as_i64().unwrap_or(0);
            // hours not converted, or off by five minutes
            if m % 60 == 0 && rng.random_bool(0.5) {
                json!(m / 60)
            } else {
                json!(m + 5)
            }
        }
        _ => {
            let x = cur.as_i64().unwrap_or(0);
            json!(x + rng.random_range(1..=9))
        }
    };
    a.insert(k, new);
    a
}

/// The assistant reply for a call (Tool-N1 format: short reasoning, then the call list).
pub fn answer_text(name: &str, args: &serde_json::Map<String, Value>) -> String {
    let calls = json!([{"name": name, "arguments": Value::Object(args.clone())}]);
    format!(
        "<think>Use {name}.</think>\n<tool_call>{}</tool_call>",
        crate::pyjson::py_json(&calls)
    )
}

/// A task instance as a unified sample (prompt = system + user; ground truth = the call).
pub fn to_sample(id: String, system: &str, item: &TaskItem) -> Sample {
    Sample {
        id,
        source: "demo".into(),
        messages: vec![
            Message {
                role: "system".into(),
                content: system.to_string(),
            },
            Message {
                role: "user".into(),
                content: item.query.clone(),
            },
        ],
        tools: demo_tools(),
        ground_truth: json!([{"name": item.name, "arguments": Value::Object(item.arguments.clone())}]),
    }
}

/// Disjoint training and held-out task instances (no query in both, none twice), drawn from
/// `rng`: about one in four draws goes to the held-out set until it is full. Gives up after
/// 100 draws per wanted item, so a small task space yields fewer items rather than a hang.
pub fn draw_disjoint(
    rng: &mut ChaCha8Rng,
    train: usize,
    heldout: usize,
) -> (Vec<TaskItem>, Vec<TaskItem>) {
    let mut seen = HashSet::new();
    let mut train_items = Vec::new();
    let mut held_items = Vec::new();
    let mut guard = 0;
    while (train_items.len() < train || held_items.len() < heldout)
        && guard < 100 * (train + heldout + 1)
    {
        guard += 1;
        let it = draw_task(rng);
        if !seen.insert(it.query.clone()) {
            continue;
        }
        if held_items.len() < heldout && (guard % 4 == 0 || train_items.len() >= train) {
            held_items.push(it);
        } else if train_items.len() < train {
            train_items.push(it);
        }
    }
    (train_items, held_items)
}

/// `n` SFT samples over `items` (cycled): the prompt of [`to_sample`] plus an assistant answer
/// whose arguments are [`corrupt`]ed with probability `noise`.
pub fn sft_samples(
    rng: &mut ChaCha8Rng,
    items: &[TaskItem],
    n: usize,
    noise: f64,
    system: &str,
) -> Vec<Sample> {
    if items.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(n);
    for k in 0..n {
        let it = &items[k % items.len()];
        let args = if rng.random_bool(noise) {
            corrupt(rng, it)
        } else {
            it.arguments.clone()
        };
        let mut s = to_sample(format!("sft-{k}"), system, it);
        s.messages.push(Message {
            role: "assistant".into(),
            content: answer_text(&it.name, &args),
        });
        out.push(s);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reward::{Reward, ToolN1Reward};
    use rand::SeedableRng;

    #[test]
    fn tasks_and_corruptions() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..200 {
            let it = draw_task(&mut rng);
            assert!(!it.query.is_empty());
            let bad = corrupt(&mut rng, &it);
            assert_ne!(bad, it.arguments, "{it:?}");
            assert_eq!(bad.len(), it.arguments.len());
            let reward = ToolN1Reward::default();
            let gt = json!([{"name": it.name, "arguments": Value::Object(it.arguments.clone())}]);
            let good = answer_text(&it.name, &it.arguments);
            assert_eq!(reward.score(&good, &gt).reward, 1.0, "{good}");
            let wrong = answer_text(&it.name, &bad);
            assert_eq!(reward.score(&wrong, &gt).reward, 0.0, "{wrong}");
        }
    }
}

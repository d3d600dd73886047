//! RULER's variable tracking: a chain `VAR A = 12345`, `VAR B = VAR A`, … hidden in noise; the
//! question asks for every variable that holds the value. One in-context example precedes the
//! haystack, as in RULER.
use super::niah::NOISE;
use super::{Prompt, Rng};
use crate::error::Result;

const HOPS: usize = 4;

fn instruction() -> &'static str {
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
}

fn question(value: &str) -> String {
    format!("Question: Find all variables that are assigned the value {value} in the text above.")
}

fn prefix(value: &str) -> String {
    format!(
        "Answer: According to the chain(s) of variable assignment in the text above, {} variables are assigned the value {value}, they are:",
        HOPS + 1
    )
}

/// A chain of `HOPS + 1` distinct variables (`letters` upper-case letters each) hidden among
/// `noise` noise lines; returns the text, the value and the variables.
fn chain(rng: &mut Rng, noise: usize, letters: usize) -> (String, String, Vec<String>) {
    let mut vars: Vec<String> = Vec::new();
    while vars.len() < HOPS + 1 {
        let v: String = (0..letters)
            .map(|_| (b'A' + rng.below(26) as u8) as char)
            .collect();
        if !vars.contains(&v) {
            vars.push(v);
        }
    }
    let value = (10_000 + rng.below(90_000)).to_string();
    let mut statements = vec![format!("VAR {} = {value}.", vars[0])];
    for w in vars.windows(2) {
        statements.push(format!("VAR {} = VAR {}.", w[1], w[0]));
    }
    // Sorted insertion points keep the chain in order.
    let mut at: Vec<usize> = statements.iter().map(|_| rng.below(noise + 1)).collect();
    at.sort_unstable();
    let mut lines: Vec<String> = Vec::new();
    let mut next = 0;
    for i in 0..=noise {
        while next < at.len() && at[next] == i {
            lines.push(statements[next].clone());
            next += 1;
        }
        if i < noise {
            lines.push(NOISE.to_string());
        }
    }
    (lines.join("\n"), value, vars)
}

/// The prompt with `units` noise lines.
pub fn build(rng: &mut Rng, units: usize) -> Result<Prompt> {
    let (ex_text, ex_value, ex_vars) = chain(rng, 6, 3);
    let example = format!(
        "{}{ex_text}\n{} {} {}\n\n",
        instruction(),
        question(&ex_value),
        prefix(&ex_value),
        ex_vars.join(" ")
    );
    let (text, value, vars) = chain(rng, units, 5);
    Ok(Prompt {
        context: format!("{example}{}{text}\n", instruction()),
        question: question(&value),
        prefix: prefix(&value),
        target: format!(" {}", vars.join(" ")),
        refs: vars,
    })
}

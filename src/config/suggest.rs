//! "Did you mean …?" for misspelt names, shared by the configuration and the templates.

/// The candidate a misspelt `name` most likely meant: the same name in another case
/// (`statuscode` → `statusCode`), else the most similar one if it is similar enough to be a
/// typo (Jaro-Winkler ≥ 0.8 on lowercase: `lisen` → `listen`, `fsyn` → `fsync`).
pub fn did_you_mean<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let lower = name.to_lowercase();
    let mut best: Option<(f64, &str)> = None;
    for c in candidates {
        let c_lower = c.to_lowercase();
        let score = if c_lower == lower { 2.0 } else { strsim::jaro_winkler(&lower, &c_lower) };
        if score >= 0.8 && best.is_none_or(|(b, _)| score > b) {
            best = Some((score, c));
        }
    }
    best.map(|(_, c)| c)
}

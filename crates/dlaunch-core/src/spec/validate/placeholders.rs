//! Placeholders in commands: safe for every value they can take, and `{name}` that is no matrix key reported.

use super::*;

impl Validator<'_> {
    /// Every placeholder must be safe where it stands, for every value it can take; a
    /// `{name}` that is no matrix key is reported (an error when it is a near miss of one).
    pub(super) fn placeholders(&mut self, template: &TaskTemplate, command: &str, at: &FieldPath) {
        let first: Option<Vec<(String, String)>> =
            template.matrix.iter().map(|axis| Some((axis.key.clone(), axis.values.first()?.clone()))).collect();
        // An empty list is an error of its own already.
        let Some(first) = first else { return };
        let scan = match substitute::scan(command, &first) {
            Ok(scan) => scan,
            Err(refused) => return self.refused(command, at, &first, &refused),
        };
        let keys: Vec<&str> = template.matrix.iter().map(|axis| axis.key.as_str()).collect();
        for unknown in &scan.unknown {
            let needle = format!("{{{}}}", unknown.name);
            let nth = command[..unknown.offset].matches(&needle).count();
            let mut problem = SpecError::at(self.file, self.map, at, String::new());
            problem.position = self.map.find_in(at, &needle, nth).or(problem.position);
            let near = near_miss(&unknown.name, &keys);
            problem.message = unknown_message(&needle, &keys, near, self.strict_placeholders);
            if near.is_some() || self.strict_placeholders {
                self.errors.push(problem);
            } else {
                self.warnings.push(problem);
            }
        }
        if scan.value_sensitive {
            for params in template.combinations() {
                if let Err(refused) = substitute::scan(command, &params) {
                    return self.refused(command, at, &params, &refused);
                }
            }
        }
    }

    pub(super) fn refused(&mut self, command: &str, at: &FieldPath, params: &[(String, String)], refused: &Refused) {
        let needle = format!("{{{}}}", refused.key);
        let nth = command.get(..refused.offset).map_or(0, |before| before.matches(&needle).count());
        let value = params.iter().find(|(k, _)| *k == refused.key).map_or("", |(_, v)| v.as_str());
        let mut error =
            SpecError::at(self.file, self.map, at, format!("with {needle} = {value:?}: {}", refused.reason));
        error.position = self.map.find_in(at, &needle, nth).or(error.position);
        self.errors.push(error);
    }
}

/// A key `name` was probably meant to be: the same but for case, or (for names long enough
/// that a typo is likelier than a different word) one edit away, two for long keys.
pub(super) fn near_miss<'k>(name: &str, keys: &[&'k str]) -> Option<&'k str> {
    keys.iter().copied().find(|k| k.eq_ignore_ascii_case(name)).or_else(|| {
        keys.iter()
            .copied()
            .filter(|k| k.len().min(name.len()) >= 3)
            .map(|k| (strsim::damerau_levenshtein(name, k), k))
            .filter(|(distance, k)| *distance <= 1.max(k.len() / 4))
            .min()
            .map(|(_, k)| k)
    })
}

pub(super) fn unknown_message(placeholder: &str, keys: &[&str], near: Option<&str>, strict: bool) -> String {
    let keys_are = if keys.is_empty() {
        "this task has no matrix".to_string()
    } else {
        format!("matrix keys: {}", keys.join(", "))
    };
    if let Some(key) = near {
        return format!("{placeholder} is not a matrix key: did you mean {{{key}}}? ({keys_are})");
    }
    if strict {
        return format!("{placeholder} is not a matrix key ({keys_are}; [job] strict_placeholders is on)");
    }
    let closest = keys.iter().min_by_key(|k| strsim::damerau_levenshtein(placeholder, k));
    let guess = closest.map(|k| format!("did you mean {{{k}}}? ")).unwrap_or_default();
    format!(
        "{placeholder} is not a matrix key, so the shell gets it as written; {guess}({keys_are}; \
         [job] strict_placeholders = true makes this an error)"
    )
}

//! "Did you mean" hints for misspelled keys and options.

/// Returns the candidate closest to `word`, if it is close enough to be a likely typo.
pub(crate) fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let normalized = word.to_ascii_lowercase().replace('_', "-");
    candidates
        .iter()
        .map(|candidate| (edit_distance(&normalized, candidate), *candidate))
        .filter(|(distance, candidate)| *distance <= max_typo_distance(candidate))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

/// Builds the hint for an unknown name: a suggestion, or else the list of known names.
pub(crate) fn unknown_name_hint(word: &str, candidates: &[&str], kind: &str) -> String {
    match closest(word, candidates) {
        Some(candidate) => format!("did you mean `{candidate}`?"),
        None => format!("remove it; the known {kind} are {}", candidates.join(", ")),
    }
}

/// Short names tolerate one typo, longer ones two.
fn max_typo_distance(candidate: &str) -> usize {
    if candidate.len() <= 4 {
        1
    } else {
        2
    }
}

/// Edit distance over characters in which swapping two neighbours counts as one edit, as
/// in `nmae` for `name` (optimal string alignment distance).
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    // distances[i][j] is the distance between the first i chars of a and the first j of b.
    let mut distances = vec![vec![0; b.len() + 1]; a.len() + 1];
    for (i, row) in distances.iter_mut().enumerate() {
        row[0] = i;
    }
    distances[0] = (0..=b.len()).collect();
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let substitution = distances[i - 1][j - 1] + usize::from(a[i - 1] != b[j - 1]);
            let mut best = substitution
                .min(distances[i - 1][j] + 1)
                .min(distances[i][j - 1] + 1);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(distances[i - 2][j - 2] + 1);
            }
            distances[i][j] = best;
        }
    }
    distances[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closest_finds_typo() {
        assert_eq!(closest("imgae", &["image", "env"]), Some("image"));
    }

    #[test]
    fn closest_maps_underscores_to_dashes() {
        let options = ["name", "continue-on-error"];
        assert_eq!(
            closest("continue_on_error", &options),
            Some("continue-on-error")
        );
    }

    #[test]
    fn closest_rejects_distant_word() {
        assert_eq!(closest("colour", &["image", "env"]), None);
    }

    #[test]
    fn edit_distance_counts_edits() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("same", "same"), 0);
        assert_eq!(edit_distance("nmae", "name"), 1);
    }
}

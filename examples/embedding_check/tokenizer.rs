//! BERT uncased tokenizer: the basic tokenizer (clean, CJK spacing, lowercase, strip accents, split on
//! whitespace and punctuation), then greedy longest-match-first WordPiece with `##` continuations.
//!
//! It follows Hugging Face `BertTokenizer` without a Unicode database; the character classes are tables
//! written here. Control characters: Cc, the common Cf and private use (unassigned code points are kept).
//! Punctuation: ASCII symbols, and category P in Latin-1, Greek, Armenian, Hebrew, Arabic, Devanagari,
//! General and Supplemental Punctuation, CJK, vertical, small and fullwidth forms (other scripts' marks are
//! kept inside words). Accents: the precomposed letters of the Latin, Greek and Cyrillic blocks
//! ([`ACCENTED_BASES`]) and the combining marks U+0300-036F, U+0483-0487, U+1AB0-1ABD, U+1DC0-1DFF and
//! U+FE20-FE2F; other scripts keep theirs.

use std::collections::HashMap;

/// Words longer than this many characters become `[UNK]` (BERT's `max_input_chars_per_word`).
pub const MAX_CHARS_PER_WORD: usize = 100;

/// A vocabulary and the ids of the special tokens.
#[derive(Debug)]
pub struct Tokenizer {
    vocab: HashMap<String, u32>,
    lowercase: bool,
    unk: u32,
    cls: u32,
    sep: u32,
}

/// A problem with a vocabulary.
#[derive(Debug, PartialEq, Eq)]
pub struct VocabError(pub String);

impl std::fmt::Display for VocabError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for VocabError {}

impl Tokenizer {
    /// Builds a tokenizer from the text of a `vocab.txt` (one token per line; the id is the line number).
    /// A token listed twice keeps its last line, as Hugging Face's `load_vocab` does.
    pub fn from_vocab_text(text: &str, lowercase: bool) -> Result<Tokenizer, VocabError> {
        let mut vocab = HashMap::new();
        for (id, line) in text.lines().enumerate() {
            let id = u32::try_from(id).map_err(|_| VocabError("more than 2^32 tokens".into()))?;
            vocab.insert(line.to_string(), id);
        }
        let special = |token: &str| {
            vocab
                .get(token)
                .copied()
                .ok_or_else(|| VocabError(format!("the vocabulary has no {token}")))
        };
        Ok(Tokenizer {
            unk: special("[UNK]")?,
            cls: special("[CLS]")?,
            sep: special("[SEP]")?,
            vocab,
            lowercase,
        })
    }

    /// `[CLS] pieces [SEP]`, the pieces cut so that the whole is at most `max_len` ids (at least 2).
    pub fn encode(&self, text: &str, max_len: usize) -> Vec<u32> {
        let mut ids = vec![self.cls];
        for word in basic_tokenize(text, self.lowercase) {
            ids.extend(self.wordpiece(&word));
        }
        ids.truncate(max_len.max(2) - 1);
        ids.push(self.sep);
        ids
    }

    /// Greedy longest-match-first WordPiece of one word; `[UNK]` for the whole word when a piece is missing
    /// or the word is longer than [`MAX_CHARS_PER_WORD`].
    pub fn wordpiece(&self, word: &str) -> Vec<u32> {
        // Char boundaries, so slices never cut a character.
        let bounds: Vec<usize> = word
            .char_indices()
            .map(|(i, _)| i)
            .chain([word.len()])
            .collect();
        let chars = bounds.len() - 1;
        if chars > MAX_CHARS_PER_WORD {
            return vec![self.unk];
        }
        let mut pieces = Vec::new();
        let mut start = 0;
        let mut candidate = String::new();
        while start < chars {
            let mut found = None;
            for end in (start + 1..=chars).rev() {
                candidate.clear();
                if start > 0 {
                    candidate.push_str("##");
                }
                candidate.push_str(&word[bounds[start]..bounds[end]]);
                if let Some(&id) = self.vocab.get(&candidate) {
                    found = Some((id, end));
                    break;
                }
            }
            match found {
                Some((id, end)) => {
                    pieces.push(id);
                    start = end;
                }
                None => return vec![self.unk],
            }
        }
        pieces
    }
}

/// The basic tokenizer: words and punctuation marks, lowercased and without accents when `lowercase`.
pub fn basic_tokenize(text: &str, lowercase: bool) -> Vec<String> {
    let mut spaced = String::with_capacity(text.len());
    for c in text.chars() {
        if c == '\0' || c == '\u{fffd}' || is_control(c) {
            continue;
        }
        if is_whitespace(c) {
            spaced.push(' ');
        } else if is_cjk(c) {
            spaced.push(' ');
            spaced.push(c);
            spaced.push(' ');
        } else {
            spaced.push(c);
        }
    }
    let mut words = Vec::new();
    for token in spaced.split_whitespace() {
        let token = if lowercase {
            strip_accents(&token.to_lowercase())
        } else {
            token.to_string()
        };
        let mut word = String::new();
        for c in token.chars() {
            if is_punctuation(c) {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
                words.push(c.to_string());
            } else {
                word.push(c);
            }
        }
        if !word.is_empty() {
            words.push(word);
        }
    }
    words
}

/// Removes combining marks and replaces precomposed Latin letters by their base letter.
pub fn strip_accents(text: &str) -> String {
    text.chars()
        .filter(|&c| !is_combining_mark(c))
        .map(|c| base_letter(c).unwrap_or(c))
        .collect()
}

/// What stripping accents leaves of each character of Latin-1 to Latin Extended-B, Greek, Cyrillic, Latin
/// Extended Additional and Greek Extended, in code-point order from each start; `.` where the character stays
/// as it is. Generated from Python's `unicodedata` (Unicode 14), for each character `c`:
///     d = unicodedata.normalize("NFD", c)
///     base = d[0] if d != c and all(unicodedata.category(m) == "Mn" for m in d[1:]) else "."
const ACCENTED_BASES: &[(u32, &str)] = &[
    (
        0x00C0,
        concat!(
            "AAAAAA.CEEEEIIII.NOOOOO..UUUUY..", // U+00C0
            "aaaaaa.ceeeeiiii.nooooo..uuuuy.y", // U+00E0
            "AaAaAaCcCcCcCcDd..EeEeEeEeEeGgGg", // U+0100
            "GgGgHh..IiIiIiIiI...JjKk.LlLlLl.", // U+0120
            "...NnNnNn...OoOoOo..RrRrRrSsSsSs", // U+0140
            "SsTtTt..UuUuUuUuUuUuWwYyYZzZzZz.", // U+0160
            "................................", // U+0180
            "Oo.............Uu...............", // U+01A0
            ".............AaIiOoUuUuUuUuUu.Aa", // U+01C0
            "AaÆæ..GgKkOoOoƷʒj...Gg..NnAaÆæØø", // U+01E0
            "AaAaEeEeIiIiOoOoRrRrUuUuSsTt..Hh", // U+0200
            "......AaEeOoOoOoOoYy............", // U+0220
            "................",                 // U+0240
        ),
    ),
    (
        0x0370,
        concat!(
            "....ʹ.........;......¨Α·ΕΗΙ.Ο.ΥΩ", // U+0370
            "ι.........................ΙΥαεηι", // U+0390
            "υ.........................ιυουω.", // U+03B0
            "...ϒϒ...........................", // U+03D0
            "................ЕЕ.Г...І....КИУ.", // U+03F0
            ".........И......................", // U+0410
            ".........и......................", // U+0430
            "ее.г...і....киу.................", // U+0450
            "......Ѵѵ........................", // U+0470
            "................................", // U+0490
            ".................Жж.............", // U+04B0
            "АаАа..Ее..ӘәЖжЗз..ИиИиОо..ӨөЭэУу", // U+04D0
            "УуУуЧч..Ыы......",                 // U+04F0
        ),
    ),
    (
        0x1E00,
        concat!(
            "AaBbBbBbCcDdDdDdDdDdEeEeEeEeEeFf", // U+1E00
            "GgHhHhHhHhHhIiIiKkKkKkLlLlLlLlMm", // U+1E20
            "MmMmNnNnNnNnOoOoOoOoPpPpRrRrRrRr", // U+1E40
            "SsSsSsSsSsTtTtTtTtUuUuUuUuUuVvVv", // U+1E60
            "WwWwWwWwWwXxXxYyZzZzZzhtwy.ſ....", // U+1E80
            "AaAaAaAaAaAaAaAaAaAaAaAaEeEeEeEe", // U+1EA0
            "EeEeEeEeIiIiOoOoOoOoOoOoOoOoOoOo", // U+1EC0
            "OoOoUuUuUuUuUuUuUuYyYyYyYy......", // U+1EE0
            "ααααααααΑΑΑΑΑΑΑΑεεεεεε..ΕΕΕΕΕΕ..", // U+1F00
            "ηηηηηηηηΗΗΗΗΗΗΗΗιιιιιιιιΙΙΙΙΙΙΙΙ", // U+1F20
            "οοοοοο..ΟΟΟΟΟΟ..υυυυυυυυ.Υ.Υ.Υ.Υ", // U+1F40
            "ωωωωωωωωΩΩΩΩΩΩΩΩααεεηηιιοουυωω..", // U+1F60
            "ααααααααΑΑΑΑΑΑΑΑηηηηηηηηΗΗΗΗΗΗΗΗ", // U+1F80
            "ωωωωωωωωΩΩΩΩΩΩΩΩααααα.ααΑΑΑΑΑ.ι.", // U+1FA0
            ".¨ηηη.ηηΕΕΗΗΗ᾿᾿᾿ιιιι..ιιΙΙΙΙ.῾῾῾", // U+1FC0
            "υυυυρρυυΥΥΥΥΡ¨¨`..ωωω.ωωΟΟΩΩΩ´..", // U+1FE0
        ),
    ),
];

fn base_letter(c: char) -> Option<char> {
    let cp = c as u32;
    ACCENTED_BASES.iter().find_map(|&(start, bases)| {
        let base = bases.chars().nth(cp.checked_sub(start)? as usize)?;
        (base != '.').then_some(base)
    })
}

fn is_combining_mark(c: char) -> bool {
    matches!(
        c,
        '\u{300}'..='\u{36f}'
            | '\u{483}'..='\u{487}'
            | '\u{1ab0}'..='\u{1abd}'
            | '\u{1dc0}'..='\u{1dff}'
            | '\u{fe20}'..='\u{fe2f}'
    )
}

/// Characters BERT drops: Unicode categories Cc, Cf and Co, except tab, newline and carriage return.
pub fn is_control(c: char) -> bool {
    if matches!(c, '\t' | '\n' | '\r') {
        return false;
    }
    c.is_control()
        || matches!(
            c,
            '\u{ad}'
                | '\u{600}'..='\u{605}'
                | '\u{61c}'
                | '\u{6dd}'
                | '\u{70f}'
                | '\u{180e}'
                | '\u{200b}'..='\u{200f}'
                | '\u{202a}'..='\u{202e}'
                | '\u{2060}'..='\u{2064}'
                | '\u{2066}'..='\u{206f}'
                | '\u{feff}'
                | '\u{fff9}'..='\u{fffb}'
                | '\u{e000}'..='\u{f8ff}'
                | '\u{f0000}'..='\u{10ffff}'
        )
}

/// Space, tab, newline, carriage return and the space separators (category Zs).
pub fn is_whitespace(c: char) -> bool {
    matches!(
        c,
        ' ' | '\t' | '\n' | '\r' | '\u{a0}' | '\u{1680}' | '\u{2000}'
            ..='\u{200a}' | '\u{202f}' | '\u{205f}' | '\u{3000}'
    )
}

/// CJK ideographs, which BERT surrounds with spaces so that each is a word.
pub fn is_cjk(c: char) -> bool {
    matches!(
        c,
        '\u{4e00}'..='\u{9fff}'
            | '\u{3400}'..='\u{4dbf}'
            | '\u{20000}'..='\u{2a6df}'
            | '\u{2a700}'..='\u{2b73f}'
            | '\u{2b740}'..='\u{2b81f}'
            | '\u{2b820}'..='\u{2ceaf}'
            | '\u{f900}'..='\u{faff}'
            | '\u{2f800}'..='\u{2fa1f}'
    )
}

/// All ASCII symbols and punctuation, and the Unicode punctuation (category P) of the blocks listed in the
/// module docs.
pub fn is_punctuation(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_punctuation();
    }
    matches!(
        c,
        '\u{a1}'
            | '\u{a7}'
            | '\u{ab}'
            | '\u{b6}'
            | '\u{b7}'
            | '\u{bb}'
            | '\u{bf}'
            | '\u{37e}'
            | '\u{387}'
            | '\u{55a}'..='\u{55f}'
            | '\u{589}'..='\u{58a}'
            | '\u{5be}'
            | '\u{5c0}'
            | '\u{5c3}'
            | '\u{5c6}'
            | '\u{5f3}'..='\u{5f4}'
            | '\u{60c}'..='\u{60d}'
            | '\u{61b}'
            | '\u{61f}'
            | '\u{66a}'..='\u{66d}'
            | '\u{6d4}'
            | '\u{964}'..='\u{965}'
            | '\u{970}'
            | '\u{2010}'..='\u{2027}'
            | '\u{2030}'..='\u{2043}'
            | '\u{2045}'..='\u{2051}'
            | '\u{2053}'..='\u{205e}'
            | '\u{207d}'..='\u{207e}'
            | '\u{208d}'..='\u{208e}'
            | '\u{2308}'..='\u{230b}'
            | '\u{2329}'..='\u{232a}'
            | '\u{2e00}'..='\u{2e2e}'
            | '\u{2e30}'..='\u{2e4f}'
            | '\u{3001}'..='\u{3003}'
            | '\u{3008}'..='\u{3011}'
            | '\u{3014}'..='\u{301f}'
            | '\u{3030}'
            | '\u{303d}'
            | '\u{30a0}'
            | '\u{30fb}'
            | '\u{fe10}'..='\u{fe19}'
            | '\u{fe30}'..='\u{fe52}'
            | '\u{fe54}'..='\u{fe61}'
            | '\u{fe63}'
            | '\u{fe68}'
            | '\u{fe6a}'..='\u{fe6b}'
            | '\u{ff01}'..='\u{ff03}'
            | '\u{ff05}'..='\u{ff0a}'
            | '\u{ff0c}'..='\u{ff0f}'
            | '\u{ff1a}'..='\u{ff1b}'
            | '\u{ff1f}'..='\u{ff20}'
            | '\u{ff3b}'..='\u{ff3d}'
            | '\u{ff3f}'
            | '\u{ff5b}'
            | '\u{ff5d}'
            | '\u{ff5f}'..='\u{ff65}'
    )
}

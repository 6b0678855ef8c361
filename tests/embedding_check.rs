//! Tests of the embedding_check example's tokenizer and BERT forward pass (its modules are included here).
//! The forward pass is checked against fixtures/tiny_bert, made by Hugging Face transformers
//! (scripts/make_tiny_bert.py); the tokenizer also against hand-made vocabularies.

#[allow(dead_code)]
#[path = "../examples/embedding_check/bert.rs"]
mod bert;
#[allow(dead_code)]
#[path = "../examples/embedding_check/tokenizer.rs"]
mod tokenizer;
#[allow(dead_code)]
#[path = "../examples/embedding_check/weights.rs"]
mod weights;

use std::path::{Path, PathBuf};

use bert::{cosine, erf, gelu, BertConfig, BertModel};
use neuzip::convert::{convert_to_vec, ConvertOptions};
use neuzip::source::SafetensorsFile;
use neuzip::Dtype;
use tokenizer::{basic_tokenize, Tokenizer};
use weights::{to_f32, Checkpoint};

fn tiny_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny_bert")
}

struct Expected {
    max_seq_len: usize,
    sentences: Vec<String>,
    token_ids: Vec<Vec<u32>>,
    hidden_states: Vec<Vec<f32>>,
    embeddings: Vec<Vec<f32>>,
}

fn expected() -> Expected {
    let text = std::fs::read_to_string(tiny_dir().join("expected.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let floats = |key: &str| -> Vec<Vec<f32>> { serde_json::from_value(v[key].clone()).unwrap() };
    Expected {
        max_seq_len: v["max_seq_len"].as_u64().unwrap() as usize,
        sentences: serde_json::from_value(v["sentences"].clone()).unwrap(),
        token_ids: serde_json::from_value(v["token_ids"].clone()).unwrap(),
        hidden_states: floats("hidden_states"),
        embeddings: floats("embeddings"),
    }
}

fn tiny_config() -> BertConfig {
    BertConfig::from_json(&std::fs::read_to_string(tiny_dir().join("config.json")).unwrap())
        .unwrap()
}

fn tiny_model(path: &Path) -> BertModel {
    BertModel::load(&tiny_config(), &Checkpoint::open(path).unwrap()).unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

// ---- forward pass against transformers ----

#[test]
fn tiny_bert_token_ids_match_transformers() {
    let exp = expected();
    let vocab = std::fs::read_to_string(tiny_dir().join("vocab.txt")).unwrap();
    let tok = Tokenizer::from_vocab_text(&vocab, true).unwrap();
    for (sentence, ids) in exp.sentences.iter().zip(&exp.token_ids) {
        assert_eq!(&tok.encode(sentence, exp.max_seq_len), ids, "{sentence:?}");
    }
}

#[test]
fn tiny_bert_hidden_states_and_embeddings_match_transformers() {
    let exp = expected();
    let model = tiny_model(&tiny_dir().join("model.safetensors"));
    let states = model.encode(&exp.token_ids).unwrap();
    for (i, (ours, theirs)) in states.iter().zip(&exp.hidden_states).enumerate() {
        let diff = max_abs_diff(ours, theirs);
        assert!(diff < 1e-4, "sentence {i}: hidden states differ by {diff}");
    }
    let embeddings = model.embed(&exp.token_ids).unwrap();
    for (i, (ours, theirs)) in embeddings.iter().zip(&exp.embeddings).enumerate() {
        let cos = cosine(ours, theirs);
        assert!(cos > 0.999_999, "sentence {i}: cosine {cos}");
        assert!(max_abs_diff(ours, theirs) < 1e-5, "sentence {i}");
        let norm: f32 = ours.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "sentence {i}: norm {norm}");
    }
}

#[test]
fn nzt_weights_give_the_same_embeddings_as_safetensors() {
    let exp = expected();
    let st_path = tiny_dir().join("model.safetensors");
    let source = SafetensorsFile::open(&st_path).unwrap();
    let nzt = convert_to_vec(&source, &ConvertOptions::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let nzt_path = dir.path().join("tiny.nzt");
    std::fs::write(&nzt_path, nzt).unwrap();
    assert!(matches!(
        Checkpoint::open(&nzt_path).unwrap(),
        Checkpoint::Nzt(_)
    ));
    let from_st = tiny_model(&st_path).embed(&exp.token_ids).unwrap();
    let from_nzt = tiny_model(&nzt_path).embed(&exp.token_ids).unwrap();
    assert_eq!(from_st, from_nzt);
}

#[test]
fn embeddings_do_not_depend_on_the_thread_count() {
    let exp = expected();
    let model = tiny_model(&tiny_dir().join("model.safetensors"));
    let run = |threads| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| model.encode(&exp.token_ids).unwrap())
    };
    assert_eq!(run(1), run(3));
}

/// The tiny model's config.json with `key` set to `value`.
fn tiny_config_with(key: &str, value: serde_json::Value) -> String {
    let text = std::fs::read_to_string(tiny_dir().join("config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
    config[key] = value;
    config.to_string()
}

#[test]
fn shapes_that_disagree_with_the_config_are_refused() {
    let config = BertConfig::from_json(&tiny_config_with("intermediate_size", 48.into())).unwrap();
    let ckpt = Checkpoint::open(&tiny_dir().join("model.safetensors")).unwrap();
    let err = BertModel::load(&config, &ckpt)
        .err()
        .expect("shape mismatch");
    assert!(
        format!("{err:#}").contains("intermediate.dense.weight"),
        "{err:#}"
    );
}

#[test]
fn configs_the_forward_pass_cannot_run_are_refused() {
    assert!(BertConfig::from_json(&tiny_config_with("hidden_act", "gelu".into())).is_ok());
    for (key, value) in [
        ("hidden_act", "gelu_new".into()),
        ("num_attention_heads", 5.into()),
        ("position_embedding_type", "relative_key".into()),
        ("hidden_size", 0.into()),
    ] {
        let config = tiny_config_with(key, value);
        assert!(BertConfig::from_json(&config).is_err(), "{key}");
    }
}

#[test]
fn sequences_longer_than_the_position_table_or_with_unknown_ids_are_refused() {
    let model = tiny_model(&tiny_dir().join("model.safetensors"));
    let config = tiny_config();
    assert!(model
        .encode(&[vec![2; config.max_position_embeddings + 1]])
        .is_err());
    assert!(model
        .encode(&[vec![2, config.vocab_size as u32, 3]])
        .is_err());
    assert!(model
        .encode(&[vec![2; config.max_position_embeddings]])
        .is_ok());
}

#[test]
fn missing_tensors_are_reported_by_name() {
    let ckpt = Checkpoint::open(&tiny_dir().join("model.safetensors")).unwrap();
    // Names resolve with or without the "bert." prefix of the fixture.
    assert!(ckpt.tensor("embeddings.LayerNorm.weight").is_ok());
    assert!(ckpt.tensor("bert.embeddings.LayerNorm.weight").is_ok());
    let err = ckpt
        .tensor("encoder.layer.9.output.dense.weight")
        .err()
        .unwrap();
    assert!(err.to_string().contains("encoder.layer.9"), "{err}");
}

// ---- dtype conversion, erf, GELU ----

#[test]
fn float_dtypes_convert_to_f32() {
    // 1.0, -2.5 and the smallest subnormal in each format, little-endian.
    let bf16 = [0x3f80u16, 0xc020, 0x0001].map(u16::to_le_bytes).concat();
    let f16 = [0x3c00u16, 0xc100, 0x0001].map(u16::to_le_bytes).concat();
    let f32s = [1.0f32, -2.5, f32::from_bits(1)]
        .map(f32::to_le_bytes)
        .concat();
    let f64s = [1.0f64, -2.5].map(f64::to_le_bytes).concat();
    assert_eq!(
        to_f32(Dtype::BF16, &bf16).unwrap(),
        [1.0, -2.5, f32::from_bits(1 << 16)]
    );
    assert_eq!(
        to_f32(Dtype::F16, &f16).unwrap(),
        [1.0, -2.5, 2f32.powi(-24)]
    );
    assert_eq!(
        to_f32(Dtype::F32, &f32s).unwrap(),
        [1.0, -2.5, f32::from_bits(1)]
    );
    assert_eq!(to_f32(Dtype::F64, &f64s).unwrap(), [1.0, -2.5]);
    assert!(to_f32(Dtype::F16, &[0, 0, 0]).is_err());
    assert!(to_f32(Dtype::I32, &[0; 4]).is_err());
}

#[test]
fn erf_matches_tabulated_values() {
    // Abramowitz and Stegun table 7.1, to 16 digits (checked against Python's math.erf).
    for (x, value) in [
        (0.0, 0.0),
        (0.1, 0.112_462_916_018_284_9),
        (0.5, 0.520_499_877_813_046_5),
        (1.0, 0.842_700_792_949_714_9),
        (1.5, 0.966_105_146_475_310_7),
        (2.0, 0.995_322_265_018_952_7),
        (2.5, 0.999_593_047_982_555),
        (3.0, 0.999_977_909_503_001_4),
        (4.0, 0.999_999_984_582_742_1),
        (5.0, 0.999_999_999_998_462_5),
    ] {
        assert!((erf(x) - value).abs() < 1e-14, "erf({x}) = {}", erf(x));
        assert_eq!(erf(-x), -erf(x));
    }
    // The two methods meet at 2.5.
    assert!((erf(2.5 - 1e-12) - erf(2.5)).abs() < 1e-13);
    assert_eq!(erf(40.0), 1.0);
    assert!(erf(f64::NAN).is_nan());
}

#[test]
fn gelu_is_x_times_the_normal_cdf() {
    assert_eq!(gelu(0.0), 0.0);
    assert_eq!(gelu(10.0), 10.0);
    assert_eq!(gelu(-10.0), -0.0);
    // Phi(1) = 0.841344746068543, Phi(-1) = 0.158655253931457.
    assert!((gelu(1.0) as f64 - 0.841_344_746_068_543).abs() < 1e-7);
    assert!((gelu(-1.0) as f64 + 0.158_655_253_931_457).abs() < 1e-7);
}

// ---- tokenizer, with hand-made vocabularies ----

const SPECIALS: &str = "[PAD]\n[UNK]\n[CLS]\n[SEP]\n";

fn tokenizer(words: &[&str]) -> Tokenizer {
    Tokenizer::from_vocab_text(&format!("{SPECIALS}{}\n", words.join("\n")), true).unwrap()
}

/// Ids of `tokens` in a vocabulary of SPECIALS followed by `words`.
fn ids(words: &[&str], tokens: &[&str]) -> Vec<u32> {
    let specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"];
    tokens
        .iter()
        .map(|t| {
            let at = specials.iter().chain(words).position(|w| w == t);
            at.unwrap_or_else(|| panic!("{t} is not in the vocabulary")) as u32
        })
        .collect()
}

#[test]
fn basic_tokenizer_lowercases_and_strips_accents() {
    assert_eq!(
        // ø has no canonical decomposition, so it stays.
        basic_tokenize("Héllo WORLD Ça Ærø Ωμέγα Йод Việt", true),
        ["hello", "world", "ca", "ærø", "ωμεγα", "иод", "viet"]
    );
    // Combining marks go too.
    assert_eq!(basic_tokenize("Cafe\u{301} n\u{303}", true), ["cafe", "n"]);
    // Without lowercasing, nothing changes but the splitting.
    assert_eq!(basic_tokenize("Héllo WORLD", false), ["Héllo", "WORLD"]);
}

#[test]
fn basic_tokenizer_splits_on_punctuation_and_symbols() {
    assert_eq!(
        basic_tokenize(
            "hello,world!! (ok) a+b=c $5 \u{201c}q\u{201d}\u{2014}x",
            true
        ),
        [
            "hello", ",", "world", "!", "!", "(", "ok", ")", "a", "+", "b", "=", "c", "$", "5",
            "\u{201c}", "q", "\u{201d}", "\u{2014}", "x"
        ]
    );
    // Non-ASCII symbols (currency, maths) are not punctuation for BERT.
    assert_eq!(basic_tokenize("5€ 2×3", true), ["5€", "2×3"]);
}

#[test]
fn basic_tokenizer_drops_control_characters_and_splits_on_unicode_spaces() {
    assert_eq!(
        basic_tokenize(
            "hel\u{0}lo\u{200b}\tworld\u{3000}x\u{a0}y\u{7}z\u{fffd}",
            true
        ),
        ["hello", "world", "x", "yz"]
    );
    assert!(basic_tokenize(" \u{2003}\n\r ", true).is_empty());
}

#[test]
fn basic_tokenizer_makes_each_cjk_ideograph_a_word() {
    assert_eq!(basic_tokenize("ab中文cd", true), ["ab", "中", "文", "cd"]);
    // Kana are not ideographs: they stay together.
    assert_eq!(basic_tokenize("こんにちは", true), ["こんにちは"]);
}

#[test]
fn wordpiece_takes_the_longest_piece_first() {
    let words = ["un", "unaff", "##aff", "##able", "##a", "##ble"];
    let tok = tokenizer(&words);
    assert_eq!(
        tok.wordpiece("unaffable"),
        ids(&words, &["unaff", "##able"])
    );
    assert_eq!(tok.wordpiece("un"), ids(&words, &["un"]));
}

#[test]
fn wordpiece_gives_one_unk_for_a_word_with_a_missing_piece() {
    let words = ["un", "##aff", "##able"];
    let tok = tokenizer(&words);
    assert_eq!(tok.wordpiece("unaffablx"), ids(&words, &["[UNK]"]));
    assert_eq!(tok.wordpiece("xun"), ids(&words, &["[UNK]"]));
    // A continuation piece never matches at the start of a word.
    assert_eq!(tok.wordpiece("aff"), ids(&words, &["[UNK]"]));
}

#[test]
fn wordpiece_gives_unk_for_words_over_100_characters() {
    let words = ["a", "##a"];
    let tok = tokenizer(&words);
    let hundred = tok.wordpiece(&"a".repeat(100));
    assert_eq!(hundred.len(), 100);
    assert_eq!(hundred[..2], ids(&words, &["a", "##a"]));
    assert_eq!(tok.wordpiece(&"a".repeat(101)), ids(&words, &["[UNK]"]));
    // Characters, not bytes, are counted.
    let words = ["é", "##é"];
    let tok = Tokenizer::from_vocab_text(&format!("{SPECIALS}é\n##é\n"), false).unwrap();
    assert_eq!(tok.wordpiece(&"é".repeat(100)).len(), 100);
    assert_eq!(tok.wordpiece(&"é".repeat(101)), ids(&words, &["[UNK]"]));
}

#[test]
fn encode_wraps_in_cls_and_sep_and_truncates() {
    let words = ["hello", "world", ",", "##s"];
    let tok = tokenizer(&words);
    assert_eq!(
        tok.encode("Hello, worlds", 16),
        ids(&words, &["[CLS]", "hello", ",", "world", "##s", "[SEP]"])
    );
    assert_eq!(
        tok.encode("Hello, worlds", 4),
        ids(&words, &["[CLS]", "hello", ",", "[SEP]"])
    );
    assert_eq!(tok.encode("hello", 0), ids(&words, &["[CLS]", "[SEP]"]));
    assert_eq!(tok.encode("", 16), ids(&words, &["[CLS]", "[SEP]"]));
}

#[test]
fn vocabularies_need_the_special_tokens_and_keep_the_last_duplicate() {
    let err = Tokenizer::from_vocab_text("[PAD]\n[CLS]\n[SEP]\nhello\n", true).unwrap_err();
    assert!(err.0.contains("[UNK]"), "{err}");
    let tok = Tokenizer::from_vocab_text(&format!("{SPECIALS}hi\nthere\nhi\n"), true).unwrap();
    assert_eq!(tok.wordpiece("hi"), [6]);
}

#[test]
fn a_sentence_embeds_the_same_alone_and_in_a_batch() {
    let exp = expected();
    let model = tiny_model(&tiny_dir().join("model.safetensors"));
    let batch = model.embed(&exp.token_ids).unwrap();
    for (ids, in_batch) in exp.token_ids.iter().zip(&batch) {
        assert_eq!(
            &model.embed(std::slice::from_ref(ids)).unwrap()[0],
            in_batch
        );
    }
}

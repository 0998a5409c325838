//! The demo's tokenizer: a byte-level BPE trained at start on the demo's own corpus with the
//! `tokenizers` crate (offline, deterministic).

use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// Train the demo's byte-level BPE tokenizer on `corpus` (deterministic), with the Qwen special
/// tokens and the tool-call / think tags, and `system` as one added token.
pub fn train_tokenizer(corpus: &[String], vocab_size: usize, system: &str) -> Result<Tokenizer> {
    use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
    use tokenizers::models::TrainerWrapper;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::AddedToken;
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    let tags = ["<tool_call>", "</tool_call>", "<think>", "</think>"];
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(
            specials
                .iter()
                .map(|s| AddedToken::from(*s, true))
                .collect(),
        )
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut trainer = TrainerWrapper::BpeTrainer(trainer);
    let mut tk = tokenizers::Tokenizer::new(BPE::default());
    tk.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tk.with_decoder(Some(ByteLevel::new(false, true, true)));
    // BPE learns only the plain text between the special tokens, the tags and the system prompt;
    // those are added after training (ids after the learned vocabulary) and cut out of any text
    // before BPE sees it.
    let cut: Vec<&str> = specials
        .iter()
        .chain(tags.iter())
        .copied()
        .chain(std::iter::once(system))
        .collect();
    let mut pieces: Vec<String> = Vec::new();
    for text in corpus {
        let mut rest: Vec<String> = vec![text.clone()];
        for c in &cut {
            rest = rest
                .iter()
                .flat_map(|r| r.split(c).map(String::from).collect::<Vec<_>>())
                .collect();
        }
        pieces.extend(rest.into_iter().filter(|p| !p.is_empty()));
    }
    tk.train(&mut trainer, pieces.iter())
        .map_err(|e| Error::msg(format!("demo tokenizer training failed: {e}")))?;
    tk.add_special_tokens(
        &specials
            .iter()
            .map(|s| AddedToken::from(*s, true))
            .collect::<Vec<_>>(),
    );
    let mut added: Vec<AddedToken> = tags.iter().map(|s| AddedToken::from(*s, false)).collect();
    added.push(AddedToken::from(system.to_string(), false));
    tk.add_tokens(&added);
    Ok(Tokenizer { inner: tk })
}

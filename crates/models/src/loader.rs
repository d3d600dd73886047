//! One call from a GGUF path to a runnable model with its tokenizer and chat template.
use crate::gguf::Gguf;
use crate::{ChatTemplate, Llama, LlamaConfig, ModelError, Tokenizer};
use kv_tensor::KvBackend;
use std::path::Path;

/// A model ready to run.
pub struct LoadedModel<B: KvBackend> {
    /// The network.
    pub model: Llama<B>,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// Its chat template, if the file carries one.
    pub chat: Option<ChatTemplate>,
}

/// Loads a GGUF file: config from metadata, weights dequantised to f32, tokenizer, template.
pub fn load_gguf<B: KvBackend>(
    path: &Path,
    device: &B::Device,
) -> Result<LoadedModel<B>, ModelError> {
    let g = Gguf::open(path)?;
    let config = LlamaConfig::from_gguf(&g)?;
    let tokenizer = Tokenizer::from_gguf(&g)?;
    let chat = match g.get_str("tokenizer.chat_template") {
        Ok(src) => {
            let tok = |id: Option<u32>| id.and_then(|i| tokenizer.token(i)).unwrap_or_default();
            Some(ChatTemplate::new(
                src,
                &tok(tokenizer.bos),
                &tok(tokenizer.eos.first().copied()),
            )?)
        }
        Err(_) => None,
    };
    let mut model = Llama::load(config, &g, device)?;
    model.set_reconstruction_prompt(tokenizer.encode(crate::REPEAT_PROMPT)?);
    Ok(LoadedModel {
        model,
        tokenizer,
        chat,
    })
}

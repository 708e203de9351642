//! Answers encoded once per key. Most verifications of a cached key get the same answer
//! every time: `VerifyApiKey`'s VALID response for a key without usage controls, and
//! `Check`'s allow with its identity headers, removals and dynamic metadata. Building one
//! means formatting ids, joining scopes, filling maps and encoding the message; here it is
//! done on the first call and the bytes are written as they are on every later one.
//!
//! An answer is prepared for one [`Standing`] (the cache's entry for a key, with its roles
//! and chain) and served only for that same standing: a write to the key, its roles or an
//! ancestor evicts the standing, the next verification reads a new one, and the answer
//! prepared for the old one is never served again (it is replaced, or pushed out by the
//! bound). It holds the standing weakly, so it keeps no evicted key alive.
//!
//! Only what the handler would build is served: a handler asks for a prepared answer only
//! when nothing in it depends on the call beyond the key (not stale, no per-request header
//! list), and builds the message itself otherwise. What a call adds to a prepared answer
//! (a metered key's remaining credits and limits) is encoded after the prepared bytes:
//! protobuf merges a message that appears twice, the later scalar and the later embedded
//! message's fields winning and repeated fields appended, so the bytes decode as the
//! message the handler would have built.
use std::marker::PhantomData;
use std::sync::{Arc, Weak};

use bytes::{BufMut, Bytes};
use prost::Message;
use quick_cache::sync::Cache;
use tonic::Status;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use uuid::Uuid;

use crate::domain::standing::Standing;

/// Which answer of a key is prepared: keys of different kinds never share bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AnswerKind {
    /// `VerifyApiKey`'s VALID response.
    Verify,
    /// `Check`'s allow, for a request that presented its key in these headers (a bit set:
    /// which credential headers the allow removes).
    CheckAllow(u8),
}

/// A key's answer of one kind, with the standing it was prepared for.
type Slots = Cache<(Uuid, AnswerKind), (Weak<Standing>, Bytes)>;

pub struct PreparedAnswers {
    /// `None` when the verification cache is off: every verification then reads a new
    /// standing, so nothing prepared would ever be served again.
    entries: Option<Slots>,
}

impl PreparedAnswers {
    /// Room for as many answers as the verification cache holds keys
    /// (`--cache-capacity`): one per cached key and kind of answer in use.
    pub fn new(capacity: u64) -> Self {
        Self {
            entries: (capacity > 0)
                .then(|| Cache::new(usize::try_from(capacity).unwrap_or(usize::MAX))),
        }
    }

    /// The encoded answer of `kind` for this standing: prepared earlier for the same
    /// standing, or built by `build` now and kept.
    pub fn get_or_prepare<M: Message>(
        &self,
        standing: &Arc<Standing>,
        kind: AnswerKind,
        build: impl FnOnce() -> M,
    ) -> Bytes {
        let Some(entries) = &self.entries else {
            return Bytes::from(build().encode_to_vec());
        };
        let slot = (standing.key.id, kind);
        if let Some((owner, bytes)) = entries.get(&slot)
            // The weak reference keeps the old standing's allocation, so its address cannot
            // be reused by the new one: equal addresses mean the same standing.
            && std::ptr::eq(owner.as_ptr(), Arc::as_ptr(standing))
        {
            return bytes;
        }
        let bytes = Bytes::from(build().encode_to_vec());
        entries.insert(slot, (Arc::downgrade(standing), bytes.clone()));
        bytes
    }
}

/// What a handler answers: bytes prepared earlier, with what this call adds encoded after
/// them (merged into them when decoded); or a message built for this call.
pub enum Answer<M> {
    Prepared(Bytes, Option<M>),
    Built(M),
}

/// The gRPC codec of a method whose answers may be prepared: requests are decoded as
/// tonic-prost does; an answer is written as the bytes prepared, or encoded.
pub struct AnswerCodec<M, Req> {
    decode: tonic_prost::ProstCodec<M, Req>,
}

impl<M, Req> Default for AnswerCodec<M, Req> {
    fn default() -> Self {
        Self {
            decode: tonic_prost::ProstCodec::default(),
        }
    }
}

impl<M, Req> Codec for AnswerCodec<M, Req>
where
    M: Message + Send + 'static,
    Req: Message + Default + Send + 'static,
{
    type Encode = Answer<M>;
    type Decode = Req;
    type Encoder = AnswerEncoder<M>;
    type Decoder = <tonic_prost::ProstCodec<M, Req> as Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        AnswerEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        self.decode.decoder()
    }
}

pub struct AnswerEncoder<M>(PhantomData<fn(M)>);

impl<M: Message> Encoder for AnswerEncoder<M> {
    type Item = Answer<M>;
    type Error = Status;

    fn encode(&mut self, item: Self::Item, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        match item {
            Answer::Prepared(bytes, added) => {
                dst.put_slice(&bytes);
                added.map_or(Ok(()), |message| encode(message, dst))
            }
            Answer::Built(message) => encode(message, dst),
        }
    }
}

fn encode<M: Message>(message: M, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
    // The buffer grows as needed: encoding cannot run out of room.
    message
        .encode(dst)
        .map_err(|e| Status::internal(format!("cannot encode the answer: {e}")))
}

//! Reed–Solomon stripes for erasure-coded chunks: a chunk's bytes are cut into K data shards
//! and M parity shards of equal size, such that any K of the K + M rebuild the chunk. `ec:4+2`
//! survives the loss of any two shards for 1.5× the bytes; three copies survive two losses for
//! 3×.
//!
//! Layout: data shard `i` holds the chunk's bytes `[i·S, (i+1)·S)`, the last one padded with
//! zeros, so a read that finds the K data shards concatenates them and needs no decoding; the
//! parity shards are `K..K+M`. `S` is the chunk length over K, rounded up to an even number
//! (the codec works on 16-bit symbols), at least 2.
//!
//! Pure: no I/O, no clock. Callers address each shard by its BLAKE3 hash as they do chunks,
//! verify shards before handing them in, and keep the chunk's length to trim the padding.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// K + M data and parity shards. Stored in the metadata with postcard, by position; decoding
/// checks the bounds as [`Scheme::new`] does, so a scheme read from a peer or a disk is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawScheme", into = "RawScheme")]
pub struct Scheme {
    data: u8,
    parity: u8,
}

/// [`Scheme`]'s encoding.
#[derive(Serialize, Deserialize)]
struct RawScheme {
    data: u8,
    parity: u8,
}

impl TryFrom<RawScheme> for Scheme {
    type Error = ErasureError;

    fn try_from(raw: RawScheme) -> Result<Self, ErasureError> {
        Scheme::new(raw.data, raw.parity)
    }
}

impl From<Scheme> for RawScheme {
    fn from(scheme: Scheme) -> Self {
        RawScheme { data: scheme.data, parity: scheme.parity }
    }
}

/// Most data shards: a stripe wider than this puts every read and rebuild on more nodes than a
/// cluster this size is likely to have, for little saving.
pub const DATA_SHARDS_MAX: u8 = 32;
/// Most parity shards.
pub const PARITY_SHARDS_MAX: u8 = 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ErasureError {
    #[error("invalid erasure scheme {0:?}: write K+M with 1 <= K <= {DATA_SHARDS_MAX} and 1 <= M <= {PARITY_SHARDS_MAX}, e.g. ec:4+2")]
    InvalidScheme(String),
    #[error("unrecoverable: {lost} of {total} shards lost, at most {parity} may be")]
    Unrecoverable { lost: usize, total: usize, parity: usize },
    #[error("shard {index} has {got} bytes, a stripe of this chunk has {expected}-byte shards")]
    ShardSize { index: usize, expected: usize, got: usize },
    #[error("{got} shard slots given for a {expected}-shard stripe")]
    ShardCount { expected: usize, got: usize },
    #[error("shard {index} does not exist in a {total}-shard stripe")]
    NoSuchShard { index: usize, total: usize },
    /// The codec refused what the checks above let through: a bug, said as such.
    #[error("Reed-Solomon codec: {0}")]
    Codec(String),
}

impl Scheme {
    pub fn new(data: u8, parity: u8) -> Result<Self, ErasureError> {
        if !(1..=DATA_SHARDS_MAX).contains(&data) || !(1..=PARITY_SHARDS_MAX).contains(&parity) {
            return Err(ErasureError::InvalidScheme(format!("{data}+{parity}")));
        }
        Ok(Self { data, parity })
    }

    /// K: shards that hold the chunk's bytes, and how many any rebuild needs.
    pub fn data_shards(self) -> usize {
        usize::from(self.data)
    }

    /// M: shards that may be lost.
    pub fn parity_shards(self) -> usize {
        usize::from(self.parity)
    }

    pub fn total_shards(self) -> usize {
        self.data_shards() + self.parity_shards()
    }

    /// Bytes stored per byte of chunk, padding aside: (K + M) / K.
    pub fn overhead(self) -> f64 {
        self.total_shards() as f64 / self.data_shards() as f64
    }

    /// The size of each shard of a `chunk_len`-byte chunk.
    pub fn shard_bytes(self, chunk_len: usize) -> usize {
        let per_shard = chunk_len.div_ceil(self.data_shards()).max(2);
        // Saturating: no chunk comes near, but a size from the network must not panic.
        per_shard.saturating_add(per_shard % 2)
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ec:{}+{}", self.data, self.parity)
    }
}

impl FromStr for Scheme {
    type Err = ErasureError;

    /// `ec:K+M` or `K+M`.
    fn from_str(text: &str) -> Result<Self, ErasureError> {
        let invalid = || ErasureError::InvalidScheme(text.chars().take(32).collect());
        let spec = text.trim().strip_prefix("ec:").unwrap_or(text.trim());
        let (data, parity) = spec.split_once('+').ok_or_else(invalid)?;
        let parse = |n: &str| n.parse::<u8>().map_err(|_| invalid());
        Scheme::new(parse(data)?, parse(parity)?).map_err(|_| invalid())
    }
}

/// Cuts `chunk` into the K data shards and computes the M parity shards: K + M shards of
/// `scheme.shard_bytes(chunk.len())` bytes, in shard order.
pub fn encode(scheme: Scheme, chunk: &[u8]) -> Result<Vec<Vec<u8>>, ErasureError> {
    let shard_bytes = scheme.shard_bytes(chunk.len());
    let mut shards: Vec<Vec<u8>> = (0..scheme.data_shards())
        .map(|i| {
            let start = (i * shard_bytes).min(chunk.len());
            let end = ((i + 1) * shard_bytes).min(chunk.len());
            let mut shard = Vec::with_capacity(shard_bytes);
            shard.extend_from_slice(&chunk[start..end]);
            shard.resize(shard_bytes, 0);
            shard
        })
        .collect();
    let parity = reed_solomon_simd::encode(scheme.data_shards(), scheme.parity_shards(), &shards)
        .map_err(|e| ErasureError::Codec(e.to_string()))?;
    shards.extend(parity);
    Ok(shards)
}

/// The chunk from what is left of its stripe: `shards[i]` is shard `i` if it was read (and
/// verified), None if it is lost. Needs any K; concatenates the data shards when all of them
/// are there.
pub fn reconstruct(scheme: Scheme, chunk_len: usize, shards: &[Option<&[u8]>]) -> Result<Vec<u8>, ErasureError> {
    let data = data_shards(scheme, chunk_len, shards)?;
    let mut chunk = Vec::with_capacity(scheme.shard_bytes(chunk_len) * scheme.data_shards());
    for shard in &data {
        chunk.extend_from_slice(shard);
    }
    chunk.truncate(chunk_len);
    Ok(chunk)
}

/// Rebuilds the shards at `wanted` (lost ones, for repair) from what is left: data shards by
/// decoding, parity shards by encoding the data again. Returns them in the order asked.
pub fn rebuild_shards(
    scheme: Scheme,
    chunk_len: usize,
    shards: &[Option<&[u8]>],
    wanted: &[usize],
) -> Result<Vec<Vec<u8>>, ErasureError> {
    let total = scheme.total_shards();
    if let Some(&index) = wanted.iter().find(|&&index| index >= total) {
        return Err(ErasureError::NoSuchShard { index, total });
    }
    let data = data_shards(scheme, chunk_len, shards)?;
    let parity = if wanted.iter().any(|&index| index >= scheme.data_shards()) {
        reed_solomon_simd::encode(scheme.data_shards(), scheme.parity_shards(), &data)
            .map_err(|e| ErasureError::Codec(e.to_string()))?
    } else {
        Vec::new()
    };
    Ok(wanted
        .iter()
        .map(|&index| match index.checked_sub(scheme.data_shards()) {
            None => data[index].clone(),
            Some(parity_index) => parity[parity_index].clone(),
        })
        .collect())
}

/// The K data shards, decoded where lost.
fn data_shards(scheme: Scheme, chunk_len: usize, shards: &[Option<&[u8]>]) -> Result<Vec<Vec<u8>>, ErasureError> {
    let (k, total) = (scheme.data_shards(), scheme.total_shards());
    if shards.len() != total {
        return Err(ErasureError::ShardCount { expected: total, got: shards.len() });
    }
    let expected = scheme.shard_bytes(chunk_len);
    for (index, shard) in shards.iter().enumerate() {
        if let Some(shard) = shard {
            if shard.len() != expected {
                return Err(ErasureError::ShardSize { index, expected, got: shard.len() });
            }
        }
    }
    let present = shards.iter().filter(|shard| shard.is_some()).count();
    if present < k {
        return Err(ErasureError::Unrecoverable { lost: total - present, total, parity: scheme.parity_shards() });
    }
    if shards[..k].iter().all(Option::is_some) {
        return Ok(shards[..k].iter().flatten().map(|shard| shard.to_vec()).collect());
    }
    // Any K suffice: the data shards present and enough parity to make up the rest.
    let originals = shards[..k].iter().enumerate().filter_map(|(i, shard)| shard.map(|shard| (i, shard)));
    let missing = shards[..k].iter().filter(|shard| shard.is_none()).count();
    let recovery = shards[k..].iter().enumerate().filter_map(|(i, shard)| shard.map(|shard| (i, shard))).take(missing);
    let mut restored: BTreeMap<usize, Vec<u8>> =
        reed_solomon_simd::decode(k, scheme.parity_shards(), originals, recovery)
            .map_err(|e| ErasureError::Codec(e.to_string()))?;
    (0..k)
        .map(|i| match shards[i] {
            Some(shard) => Ok(shard.to_vec()),
            None => restored.remove(&i).ok_or_else(|| ErasureError::Codec(format!("data shard {i} was not restored"))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn bytes(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    fn lose(shards: &[Vec<u8>], lost: &[usize]) -> Vec<Option<Vec<u8>>> {
        shards.iter().enumerate().map(|(i, s)| (!lost.contains(&i)).then(|| s.clone())).collect()
    }

    fn refs(shards: &[Option<Vec<u8>>]) -> Vec<Option<&[u8]>> {
        shards.iter().map(|s| s.as_deref()).collect()
    }

    #[test]
    fn schemes_parse_print_and_refuse_nonsense() {
        let scheme: Scheme = "ec:4+2".parse().unwrap();
        assert_eq!((scheme.data_shards(), scheme.parity_shards(), scheme.total_shards()), (4, 2, 6));
        assert_eq!(scheme.to_string(), "ec:4+2");
        assert_eq!("8+3".parse::<Scheme>().unwrap().overhead(), 11.0 / 8.0);
        for bad in ["", "ec:", "4", "ec:0+2", "ec:4+0", "ec:33+1", "ec:4+17", "ec:-1+2", "ec:4+2+1", "replicate:3"] {
            let error = bad.parse::<Scheme>().unwrap_err();
            assert!(error.to_string().contains("e.g. ec:4+2"), "{bad}: {error}");
        }
    }

    #[test]
    fn a_decoded_scheme_is_as_valid_as_a_made_one() {
        let json = serde_json::to_string(&Scheme::new(4, 2).unwrap()).unwrap();
        assert_eq!(json, r#"{"data":4,"parity":2}"#);
        assert_eq!(serde_json::from_str::<Scheme>(&json).unwrap(), Scheme::new(4, 2).unwrap());
        for bad in [r#"{"data":0,"parity":2}"#, r#"{"data":4,"parity":0}"#, r#"{"data":200,"parity":2}"#] {
            assert!(serde_json::from_str::<Scheme>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn shards_are_even_sized_and_cover_the_chunk() {
        let scheme = Scheme::new(4, 2).unwrap();
        assert_eq!(scheme.shard_bytes(0), 2);
        assert_eq!(scheme.shard_bytes(1), 2);
        assert_eq!(scheme.shard_bytes(8), 2);
        assert_eq!(scheme.shard_bytes(9), 4);
        assert_eq!(scheme.shard_bytes(1 << 20), 1 << 18);
        assert_eq!(scheme.shard_bytes((1 << 20) + 1), (1 << 18) + 2);
    }

    #[test]
    fn the_data_shards_are_the_chunk_cut_in_order() {
        let scheme = Scheme::new(3, 2).unwrap();
        let chunk = bytes(10, 1);
        let shards = encode(scheme, &chunk).unwrap();
        assert_eq!(shards.len(), 5);
        assert_eq!(shards[0], chunk[0..4]);
        assert_eq!(shards[1], chunk[4..8]);
        assert_eq!(shards[2], [chunk[8], chunk[9], 0, 0], "the last is padded");
    }

    #[test]
    fn too_many_lost_shards_say_so() {
        let scheme = Scheme::new(4, 2).unwrap();
        let shards = encode(scheme, &bytes(1000, 3)).unwrap();
        let left = lose(&shards, &[0, 3, 5]);
        let error = reconstruct(scheme, 1000, &refs(&left)).unwrap_err();
        assert_eq!(error, ErasureError::Unrecoverable { lost: 3, total: 6, parity: 2 });
        assert_eq!(error.to_string(), "unrecoverable: 3 of 6 shards lost, at most 2 may be");
    }

    #[test]
    fn malformed_stripes_are_refused_not_misread() {
        let scheme = Scheme::new(4, 2).unwrap();
        let shards = encode(scheme, &bytes(1000, 3)).unwrap();
        let mut left = lose(&shards, &[1]);
        left[2].as_mut().unwrap().pop();
        assert!(matches!(reconstruct(scheme, 1000, &refs(&left)), Err(ErasureError::ShardSize { index: 2, .. })));
        let left = lose(&shards, &[]);
        assert!(matches!(reconstruct(scheme, 1000, &refs(&left[..5])), Err(ErasureError::ShardCount { .. })));
        assert!(matches!(
            rebuild_shards(scheme, 1000, &refs(&left), &[6]),
            Err(ErasureError::NoSuchShard { index: 6, total: 6 })
        ));
        // A length that does not match the shards' size is refused, not trimmed wrongly.
        assert!(matches!(reconstruct(scheme, 5000, &refs(&left)), Err(ErasureError::ShardSize { .. })));
    }

    fn stripe_case() -> impl Strategy<Value = (Scheme, Vec<u8>, Vec<usize>)> {
        (1u8..=8, 1u8..=4, 0usize..20_000).prop_flat_map(|(k, m, len)| {
            let scheme = Scheme::new(k, m).unwrap();
            let total = scheme.total_shards();
            let lost = proptest::sample::subsequence((0..total).collect::<Vec<_>>(), 0..=usize::from(m));
            (Just(scheme), proptest::collection::vec(any::<u8>(), len), lost)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Whatever the chunk and whichever M shards are lost, the chunk comes back whole and
        /// every lost shard is rebuilt byte for byte.
        #[test]
        fn any_k_shards_rebuild_the_chunk_and_the_lost_shards((scheme, chunk, lost) in stripe_case()) {
            let shards = encode(scheme, &chunk).unwrap();
            prop_assert_eq!(shards.len(), scheme.total_shards());
            prop_assert!(shards.iter().all(|s| s.len() == scheme.shard_bytes(chunk.len())));
            let left = lose(&shards, &lost);
            prop_assert_eq!(reconstruct(scheme, chunk.len(), &refs(&left)).unwrap(), chunk.clone());
            let rebuilt = rebuild_shards(scheme, chunk.len(), &refs(&left), &lost).unwrap();
            for (index, shard) in lost.iter().zip(&rebuilt) {
                prop_assert_eq!(shard, &shards[*index]);
            }
        }

        /// One more loss than the parity covers is an error, never wrong bytes.
        #[test]
        fn one_loss_too_many_is_unrecoverable((scheme, chunk, _) in stripe_case(), seed in any::<u64>()) {
            let shards = encode(scheme, &chunk).unwrap();
            let total = scheme.total_shards();
            let lost: Vec<usize> = (0..=scheme.parity_shards()).map(|i| (seed as usize + i * 7) % total).collect();
            let mut lost_set = lost.clone();
            lost_set.sort_unstable();
            lost_set.dedup();
            prop_assume!(lost_set.len() == scheme.parity_shards() + 1);
            let left = lose(&shards, &lost_set);
            let is_unrecoverable = matches!(
                reconstruct(scheme, chunk.len(), &refs(&left)),
                Err(ErasureError::Unrecoverable { .. })
            );
            prop_assert!(is_unrecoverable);
        }
    }
}

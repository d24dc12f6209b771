//! A lean serde `Deserializer` over a MessagePack slice, behind [`crate::Payload::decode`].
//!
//! It makes exactly the visitor calls that rmp-serde's `from_slice` makes for the same bytes
//! (the same `visit_*` per marker, the same handling of options, enums, unit structs and `bin`
//! in sequences), so a type decodes to the same value either way; it only skips rmp-serde's
//! generic reader, its marker state and its rich error values. Anything it does not handle
//! (MessagePack ext types, 128-bit integers) and every error make it give up with [`Bail`],
//! and the caller decodes the same bytes again with rmp-serde, which then gives the value or
//! its precise error. So errors cost a second pass, and successes never differ.
//!
//! Measured with callgrind on the example worker's `add` params (`{a, b}` into a two-field
//! struct of floats): 389 instructions per decode through rmp-serde, 261 through this.

use serde::de::{self, DeserializeSeed, Visitor};

/// The deepest nesting of arrays, maps and enum variants decoded: deeper values fail with
/// `DepthLimitExceeded`, whatever the type. rmp-serde's own limit is 1,024 arrays or maps, and
/// none for enum variants, each of which it decodes one recursion deeper: a recursive enum
/// type let a small frame overflow the decoding thread's stack, and in an unoptimized build
/// 1,000 nested arrays already overflow a thread's default 2 MiB. 256 levels fit in 2 MiB in
/// either build, with room to spare, and are far more than RPC params need.
const MAX_DEPTH: u16 = 256;

/// Decodes `bytes` into `T`, as `rmp_serde::from_slice` would, except that values nested
/// deeper than [`MAX_DEPTH`] fail with `DepthLimitExceeded` whatever `T` is.
pub(crate) fn from_slice<'de, T: de::Deserialize<'de>>(
    bytes: &'de [u8],
) -> Result<T, rmp_serde::decode::Error> {
    match try_from_slice(bytes) {
        Ok(v) => Ok(v),
        Err(Bail(())) if too_deep(bytes) => Err(rmp_serde::decode::Error::DepthLimitExceeded),
        Err(Bail(())) => rmp_serde::from_slice(bytes),
    }
}

/// Whether the MessagePack value at the start of `bytes` nests deeper than [`MAX_DEPTH`].
pub(crate) fn too_deep(bytes: &[u8]) -> bool {
    nests_as_deep_as(bytes, MAX_DEPTH as usize + 1)
}

/// Whether the MessagePack value at the start of `bytes` has arrays or maps nested `limit`
/// deep (a bare scalar is depth 0, `[[1]]` depth 2). Walks without recursion; stops at the
/// first malformed or missing byte (rmp-serde then reports it).
fn nests_as_deep_as(bytes: &[u8], limit: usize) -> bool {
    // The values left to read in each open array or map, innermost last.
    let mut open: Vec<u64> = Vec::new();
    let mut pos = 0usize;
    let be = |pos: &mut usize, n: usize| -> Option<u64> {
        let b = bytes.get(*pos..pos.checked_add(n)?)?;
        *pos += n;
        Some(b.iter().fold(0u64, |acc, &x| (acc << 8) | x as u64))
    };
    loop {
        // This value takes one place in its array or map.
        if let Some(left) = open.last_mut() {
            *left -= 1;
        }
        let Some(&m) = bytes.get(pos) else {
            return false;
        };
        pos += 1;
        let (skip, children) = match m {
            0x80..=0x8f => (0, 2 * (m & 0x0f) as u64),
            0x90..=0x9f => (0, (m & 0x0f) as u64),
            0xa0..=0xbf => ((m & 0x1f) as u64, 0),
            0xc4 | 0xd9 => (be(&mut pos, 1).unwrap_or(u64::MAX), 0),
            0xc5 | 0xda => (be(&mut pos, 2).unwrap_or(u64::MAX), 0),
            0xc6 | 0xdb => (be(&mut pos, 4).unwrap_or(u64::MAX), 0),
            0xc7 => (be(&mut pos, 1).map_or(u64::MAX, |n| n + 1), 0),
            0xc8 => (be(&mut pos, 2).map_or(u64::MAX, |n| n + 1), 0),
            0xc9 => (be(&mut pos, 4).map_or(u64::MAX, |n| n + 1), 0),
            0xca => (4, 0),
            0xcb => (8, 0),
            0xcc..=0xcf => (1 << (m - 0xcc), 0),
            0xd0..=0xd3 => (1 << (m - 0xd0), 0),
            0xd4..=0xd8 => (1 + (1 << (m - 0xd4)), 0),
            0xdc => (0, be(&mut pos, 2).unwrap_or(u64::MAX)),
            0xdd => (0, be(&mut pos, 4).unwrap_or(u64::MAX)),
            0xde => (0, be(&mut pos, 2).map_or(u64::MAX, |n| 2 * n)),
            0xdf => (0, be(&mut pos, 4).map_or(u64::MAX, |n| 2 * n)),
            // Fixints, nil, booleans and the invalid 0xc1: nothing more to read.
            _ => (0, 0),
        };
        // A length past the end: malformed, for rmp-serde to report.
        pos = match usize::try_from(skip).ok().and_then(|s| pos.checked_add(s)) {
            Some(p) if p <= bytes.len() => p,
            _ => return false,
        };
        if matches!(m, 0x80..=0x9f | 0xdc..=0xdf) {
            if open.len() + 1 >= limit {
                return true;
            }
            // Each value takes at least one byte: more than are left is malformed.
            if children > (bytes.len() - pos) as u64 {
                return false;
            }
            open.push(children);
        }
        // Close the arrays and maps whose values have all been read.
        while open.last() == Some(&0) {
            open.pop();
        }
        if open.is_empty() {
            return false;
        }
    }
}

/// The fast pass alone: `Err(Bail)` where rmp-serde must decide.
///
/// Also when the pass gave up somewhere and the type's own code swallowed that (a
/// `deserialize_with` that maps any error to a default, say) and went on: the pass had not
/// consumed what it gave up on, so what followed could decode differently. Every [`Bail`] is
/// made by [`bail`], which notes it for the pass under way on this thread.
pub(crate) fn try_from_slice<'de, T: de::Deserialize<'de>>(bytes: &'de [u8]) -> Result<T, Bail> {
    // Saved and restored: a type's code may decode another payload in the middle of this one.
    let outer = BAILED.replace(false);
    let r = T::deserialize(&mut Fast {
        buf: bytes,
        pos: 0,
        depth: 0,
    });
    let bailed = BAILED.replace(outer);
    match r {
        Ok(_) if bailed => Err(Bail(())),
        r => r,
    }
}

thread_local! {
    /// Whether the fast pass under way on this thread gave up anywhere.
    static BAILED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The fast pass gives up: the only way to make a [`Bail`].
#[cold]
fn bail() -> Bail {
    BAILED.set(true);
    Bail(())
}

/// The fast pass gave up; carries nothing, so results stay small.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Bail(());

impl std::fmt::Display for Bail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("not decodable by the fast pass")
    }
}

impl std::error::Error for Bail {}

impl de::Error for Bail {
    #[cold]
    fn custom<T: std::fmt::Display>(_msg: T) -> Self {
        bail()
    }
}

struct Fast<'de> {
    buf: &'de [u8],
    pos: usize,
    depth: u16,
}

impl<'de> Fast<'de> {
    #[inline]
    fn peek(&self) -> Result<u8, Bail> {
        self.buf.get(self.pos).copied().ok_or_else(bail)
    }

    #[inline]
    fn take(&mut self, n: usize) -> Result<&'de [u8], Bail> {
        let end = self.pos.checked_add(n).ok_or_else(bail)?;
        let s = self.buf.get(self.pos..end).ok_or_else(bail)?;
        self.pos = end;
        Ok(s)
    }

    #[inline]
    fn array<const N: usize>(&mut self) -> Result<[u8; N], Bail> {
        let s = self.take(N)?;
        Ok(s.try_into().expect("N bytes"))
    }

    /// The length that follows a str/bin/array/map marker of `n` bytes of length.
    #[inline]
    fn len(&mut self, n: usize) -> Result<usize, Bail> {
        Ok(match n {
            1 => self.array::<1>()?[0] as usize,
            2 => u16::from_be_bytes(self.array()?) as usize,
            _ => u32::from_be_bytes(self.array()?) as usize,
        })
    }

    /// Scalars, as rmp-serde's `any_num` visits them; anything else gives up. The marker
    /// `m` has been consumed.
    #[inline]
    fn number<V: Visitor<'de>>(&mut self, m: u8, visitor: V) -> Result<V::Value, Bail> {
        match m {
            0x00..=0x7f => visitor.visit_u8(m),
            0xe0..=0xff => visitor.visit_i8(m as i8),
            0xc0 => visitor.visit_unit(),
            0xc2 => visitor.visit_bool(false),
            0xc3 => visitor.visit_bool(true),
            0xcc => visitor.visit_u8(self.array::<1>()?[0]),
            0xcd => visitor.visit_u16(u16::from_be_bytes(self.array()?)),
            0xce => visitor.visit_u32(u32::from_be_bytes(self.array()?)),
            0xcf => visitor.visit_u64(u64::from_be_bytes(self.array()?)),
            0xd0 => visitor.visit_i8(self.array::<1>()?[0] as i8),
            0xd1 => visitor.visit_i16(i16::from_be_bytes(self.array()?)),
            0xd2 => visitor.visit_i32(i32::from_be_bytes(self.array()?)),
            0xd3 => visitor.visit_i64(i64::from_be_bytes(self.array()?)),
            0xca => visitor.visit_f32(f32::from_be_bytes(self.array()?)),
            0xcb => visitor.visit_f64(f64::from_be_bytes(self.array()?)),
            _ => Err(bail()),
        }
    }

    /// rmp-serde's `any_inner`: `allow_bytes` says whether a `bin` is visited as bytes (or,
    /// when false, as a sequence of its bytes, for the hints that want a sequence).
    fn any<V: Visitor<'de>>(&mut self, visitor: V, allow_bytes: bool) -> Result<V::Value, Bail> {
        let m = self.peek()?;
        self.pos += 1;
        match m {
            0xa0..=0xbf => self.str((m & 0x1f) as usize, visitor),
            0x90..=0x9f => self.seq((m & 0x0f) as usize, visitor),
            0x80..=0x8f => self.map((m & 0x0f) as usize, visitor),
            0xd9..=0xdb => {
                let n = self.len(1 << (m - 0xd9))?;
                self.str(n, visitor)
            }
            0xdc | 0xdd => {
                let n = self.len(2 << (m - 0xdc))?;
                self.seq(n, visitor)
            }
            0xde | 0xdf => {
                let n = self.len(2 << (m - 0xde))?;
                self.map(n, visitor)
            }
            0xc4..=0xc6 => {
                let n = self.len(1 << (m - 0xc4))?;
                let bytes = self.take(n)?;
                if allow_bytes {
                    visitor.visit_borrowed_bytes(bytes)
                } else {
                    // Like rmp-serde: the bytes as a sequence, without checking that the
                    // visitor took them all.
                    visitor.visit_seq(de::value::SeqDeserializer::<_, Bail>::new(
                        bytes.iter().copied(),
                    ))
                }
            }
            // Ext types (and the reserved 0xc1): rmp-serde's business.
            0xc1 | 0xc7..=0xc9 | 0xd4..=0xd8 => Err(bail()),
            _ => self.number(m, visitor),
        }
    }

    #[inline]
    fn str<V: Visitor<'de>>(&mut self, n: usize, visitor: V) -> Result<V::Value, Bail> {
        let bytes = self.take(n)?;
        // Short ASCII strings (field names, most keys) without the general UTF-8 check's
        // fixed cost.
        if bytes.len() <= 16 && bytes.iter().all(|&b| b < 0x80) {
            // SAFETY: ASCII is UTF-8.
            return visitor.visit_borrowed_str(unsafe { std::str::from_utf8_unchecked(bytes) });
        }
        match std::str::from_utf8(bytes) {
            Ok(s) => visitor.visit_borrowed_str(s),
            // rmp-serde offers invalid UTF-8 as bytes, and fails if they are refused.
            Err(_) => visitor.visit_borrowed_bytes(bytes),
        }
    }

    fn enter(&mut self) -> Result<(), Bail> {
        if self.depth >= MAX_DEPTH {
            return Err(bail());
        }
        self.depth += 1;
        Ok(())
    }

    fn seq<V: Visitor<'de>>(&mut self, n: usize, visitor: V) -> Result<V::Value, Bail> {
        self.enter()?;
        let mut access = Access { de: self, left: n };
        let v = visitor.visit_seq(&mut access)?;
        // rmp-serde fails when the visitor did not take every element.
        if access.left != 0 {
            return Err(bail());
        }
        self.depth -= 1;
        Ok(v)
    }

    fn map<V: Visitor<'de>>(&mut self, n: usize, visitor: V) -> Result<V::Value, Bail> {
        self.enter()?;
        let mut access = Access { de: self, left: n };
        let v = visitor.visit_map(&mut access)?;
        if access.left != 0 {
            return Err(bail());
        }
        self.depth -= 1;
        Ok(v)
    }
}

/// The elements of an array, or the entries of a map.
struct Access<'a, 'de> {
    de: &'a mut Fast<'de>,
    left: usize,
}

impl<'de> de::SeqAccess<'de> for Access<'_, 'de> {
    type Error = Bail;

    #[inline]
    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Bail> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        seed.deserialize(&mut *self.de).map(Some)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.left)
    }
}

impl<'de> de::MapAccess<'de> for Access<'_, 'de> {
    type Error = Bail;

    #[inline]
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Bail> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        seed.deserialize(&mut *self.de).map(Some)
    }

    #[inline]
    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Bail> {
        seed.deserialize(&mut *self.de)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.left)
    }
}

macro_rules! numbers {
    ($($name:ident)*) => {$(
        #[inline]
        fn $name<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Bail> {
            let m = self.peek()?;
            self.pos += 1;
            self.number(m, visitor)
        }
    )*};
}

impl<'de> de::Deserializer<'de> for &mut Fast<'de> {
    type Error = Bail;

    fn is_human_readable(&self) -> bool {
        false
    }

    #[inline]
    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Bail> {
        self.any(visitor, true)
    }

    numbers! {
        deserialize_bool deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64
        deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64
        deserialize_f32 deserialize_f64
    }

    fn deserialize_i128<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Bail> {
        Err(bail())
    }

    fn deserialize_u128<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Bail> {
        Err(bail())
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Bail> {
        if self.peek()? == 0xc0 {
            self.pos += 1;
            visitor.visit_none()
        } else {
            visitor.visit_some(self)
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Bail> {
        // A map of one entry, variant to its data; anything else names a unit variant.
        let m = self.peek()?;
        let len = match m {
            0x80..=0x8f => {
                self.pos += 1;
                (m & 0x0f) as usize
            }
            0xde | 0xdf => {
                self.pos += 1;
                self.len(2 << (m - 0xde))?
            }
            _ => return visitor.visit_enum(UnitVariant(self)),
        };
        if len != 1 {
            return Err(bail());
        }
        // Each level of a recursive enum recurses here: it counts towards the limit.
        self.enter()?;
        let v = visitor.visit_enum(Variant(&mut *self))?;
        self.depth -= 1;
        Ok(v)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Bail> {
        // rmp-serde's ext type wrapper.
        if name == "_ExtStruct" {
            return Err(bail());
        }
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Bail> {
        // Unit structs are written as nil or as an empty array.
        match self.peek()? {
            0xc0 | 0x90 => {
                self.pos += 1;
                visitor.visit_unit()
            }
            _ => self.any(visitor, true),
        }
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Bail> {
        self.any(visitor, false)
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, Bail> {
        self.any(visitor, false)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, Bail> {
        self.any(visitor, false)
    }

    #[inline]
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Bail> {
        self.any(visitor, false)
    }

    serde::forward_to_deserialize_any! {
        char str string bytes byte_buf unit map identifier ignored_any
    }
}

/// An enum written as its variant alone.
struct UnitVariant<'a, 'de>(&'a mut Fast<'de>);

impl<'de> de::EnumAccess<'de> for UnitVariant<'_, 'de> {
    type Error = Bail;
    type Variant = Self;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, Self), Bail> {
        let v = seed.deserialize(&mut *self.0)?;
        Ok((v, self))
    }
}

impl<'de> de::VariantAccess<'de> for UnitVariant<'_, 'de> {
    type Error = Bail;

    fn unit_variant(self) -> Result<(), Bail> {
        Ok(())
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, _seed: T) -> Result<T::Value, Bail> {
        Err(bail())
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, _visitor: V) -> Result<V::Value, Bail> {
        Err(bail())
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Bail> {
        Err(bail())
    }
}

/// An enum written as a map of one entry: the variant, then its data.
struct Variant<'a, 'de>(&'a mut Fast<'de>);

impl<'de> de::EnumAccess<'de> for Variant<'_, 'de> {
    type Error = Bail;
    type Variant = Self;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, Self), Bail> {
        let v = seed.deserialize(&mut *self.0)?;
        Ok((v, self))
    }
}

impl<'de> de::VariantAccess<'de> for Variant<'_, 'de> {
    type Error = Bail;

    fn unit_variant(self) -> Result<(), Bail> {
        // The data of a unit variant must be nil.
        if self.0.peek()? != 0xc0 {
            return Err(bail());
        }
        self.0.pos += 1;
        Ok(())
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, Bail> {
        seed.deserialize(self.0)
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, Bail> {
        self.0.any(visitor, false)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Bail> {
        self.0.any(visitor, false)
    }
}

#[cfg(test)]
mod tests {
    //! Differential tests: for every type below and every input of a corpus (random values in
    //! every MessagePack encoding, including non-minimal ones, ext types and the reserved
    //! marker; encodings of the types themselves; their truncations and one-byte mutations),
    //! the fast pass either gives up or gives exactly rmp-serde's value, and `from_slice`
    //! always agrees with rmp-serde, errors included.
    use super::*;
    use serde::Deserialize;
    use std::collections::BTreeMap;
    use std::fmt::Debug;

    /// A small deterministic generator (xorshift).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    const WORDS: &[&str] = &[
        "a", "b", "x", "t", "A", "B", "C", "D", "k", "inner", "extra",
    ];

    /// Appends one random value, in any encoding.
    fn value(r: &mut Rng, depth: u32, out: &mut Vec<u8>) {
        let pick = if depth == 0 { r.below(14) } else { r.below(18) };
        match pick {
            0 => out.push(r.below(0x80) as u8),
            1 => out.push(0xe0 | r.below(0x20) as u8),
            2 => out.push([0xc0, 0xc2, 0xc3][r.below(3) as usize]),
            3 => {
                let m = 0xcc + r.below(4) as u8;
                out.push(m);
                let n = 1 << (m - 0xcc);
                let v = r.next() >> r.below(64);
                out.extend_from_slice(&v.to_be_bytes()[8 - n..]);
            }
            4 => {
                let m = 0xd0 + r.below(4) as u8;
                out.push(m);
                let n = 1 << (m - 0xd0);
                let v = (r.next() as i64) >> r.below(64);
                out.extend_from_slice(&v.to_be_bytes()[8 - n..]);
            }
            5 => {
                out.push(0xca);
                out.extend_from_slice(&(r.below(2000) as f32 / 8.0 - 100.0).to_be_bytes());
            }
            6 => {
                out.push(0xcb);
                let f = [1.5, 3.0, -0.0, f64::NAN, 1e300, 2f64.powi(40)][r.below(6) as usize];
                out.extend_from_slice(&f.to_be_bytes());
            }
            7 | 8 => {
                let w = WORDS[r.below(WORDS.len() as u64) as usize].as_bytes();
                match r.below(4) {
                    0 => out.extend_from_slice(&[0xd9, w.len() as u8]),
                    1 => out.extend_from_slice(&[0xda, 0, w.len() as u8]),
                    _ => out.push(0xa0 | w.len() as u8),
                }
                out.extend_from_slice(w);
            }
            // Not UTF-8.
            9 => out.extend_from_slice(&[0xa2, 0xff, 0xfe]),
            10 => {
                let n = r.below(5) as usize;
                match r.below(3) {
                    0 => out.extend_from_slice(&[0xc5, 0, n as u8]),
                    1 => out.extend_from_slice(&[0xc6, 0, 0, 0, n as u8]),
                    _ => out.extend_from_slice(&[0xc4, n as u8]),
                }
                out.extend((0..n).map(|i| i as u8 * 7));
            }
            11 => out.extend_from_slice(&[0xd4, 1, 9]),
            12 => out.extend_from_slice(&[0xc7, 2, 5, 1, 2]),
            13 => out.push(0xc1),
            14 | 15 => {
                let n = r.below(4) as usize;
                match r.below(3) {
                    0 => out.extend_from_slice(&[0xdc, 0, n as u8]),
                    1 => out.extend_from_slice(&[0xdd, 0, 0, 0, n as u8]),
                    _ => out.push(0x90 | n as u8),
                }
                for _ in 0..n {
                    value(r, depth - 1, out);
                }
            }
            _ => {
                let n = r.below(4) as usize;
                match r.below(3) {
                    0 => out.extend_from_slice(&[0xde, 0, n as u8]),
                    1 => out.extend_from_slice(&[0xdf, 0, 0, 0, n as u8]),
                    _ => out.push(0x80 | n as u8),
                }
                for _ in 0..n {
                    // Mostly string keys, as structs and maps of strings want.
                    if r.below(4) == 0 {
                        value(r, depth - 1, out);
                    } else {
                        let w = WORDS[r.below(WORDS.len() as u64) as usize];
                        out.push(0xa0 | w.len() as u8);
                        out.extend_from_slice(w.as_bytes());
                    }
                    value(r, depth - 1, out);
                }
            }
        }
    }

    #[derive(Debug, Deserialize, serde::Serialize)]
    struct Pair {
        a: f64,
        b: f64,
    }

    #[derive(Debug, Deserialize, serde::Serialize)]
    struct Defaults {
        #[serde(default)]
        a: Option<i32>,
        #[serde(default)]
        b: Vec<String>,
        x: Option<bool>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Strict {
        a: u8,
    }

    #[derive(Debug, Deserialize, serde::Serialize)]
    struct Newtype(i64);

    #[derive(Debug, Deserialize, serde::Serialize)]
    struct Tuple(u8, String);

    #[derive(Debug, Deserialize, serde::Serialize)]
    struct Unit;

    #[derive(Debug, Deserialize, serde::Serialize)]
    enum E {
        A,
        B(u8),
        C(u8, String),
        D { x: i32 },
    }

    #[derive(Debug, Deserialize, serde::Serialize)]
    #[serde(untagged)]
    enum Untagged {
        P(Pair),
        N(i64),
        S(String),
    }

    #[derive(Debug, Deserialize, serde::Serialize)]
    #[serde(tag = "t")]
    enum Tagged {
        A { a: u8 },
        B,
    }

    #[derive(Debug, Deserialize, serde::Serialize)]
    struct Flat {
        k: Option<u8>,
        #[serde(flatten)]
        rest: BTreeMap<String, rmpv::Value>,
    }

    #[derive(Debug, Deserialize, serde::Serialize)]
    struct Nested {
        inner: Vec<Pair>,
        e: Option<E>,
    }

    /// A type whose own code swallows errors: a field that becomes `None` when it does not
    /// decode (here, always through the fast pass, which leaves 128-bit integers to rmp-serde).
    #[derive(Debug, Deserialize)]
    struct Lenient {
        #[serde(default, deserialize_with = "lenient")]
        a: Option<u128>,
        b: Option<u8>,
    }

    fn lenient<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u128>, D::Error> {
        Ok(u128::deserialize(d).ok())
    }

    /// Encodings of the types above (named and compact), so that the corpus holds inputs
    /// that decode, not only noise.
    fn samples() -> Vec<Vec<u8>> {
        let mut v: Vec<Vec<u8>> = Vec::new();
        macro_rules! both {
            ($($x:expr),* $(,)?) => {$(
                v.push(rmp_serde::to_vec_named(&$x).unwrap());
                v.push(rmp_serde::to_vec(&$x).unwrap());
            )*};
        }
        both!(
            Pair { a: 1.0, b: 2.5 },
            Defaults {
                a: Some(-3),
                b: vec!["x".into()],
                x: None
            },
            Newtype(-5),
            Tuple(7, "t".into()),
            Unit,
            E::A,
            E::B(1),
            E::C(2, "c".into()),
            E::D { x: -9 },
            Untagged::P(Pair { a: 0.5, b: 1.0 }),
            Untagged::N(4),
            Untagged::S("s".into()),
            Tagged::A { a: 3 },
            Tagged::B,
            Nested {
                inner: vec![Pair { a: 1.0, b: 2.0 }],
                e: Some(E::D { x: 1 })
            },
            (1u8, "x", true),
            [1u16, 2, 3],
            vec![1i64, -2, 1 << 40],
            serde_bytes::ByteBuf::from(vec![1u8, 2, 3]),
            'c',
            "hello",
            u64::MAX,
            i64::MIN,
            1.25f32,
            -2.5f64,
            Option::<u8>::None,
            (),
        );
        let mut m = BTreeMap::new();
        m.insert("a".to_string(), 1i32);
        m.insert("b".to_string(), -1i32);
        both!(m);
        v.push(
            rmp_serde::to_vec_named(&Flat {
                k: Some(1),
                rest: BTreeMap::new(),
            })
            .unwrap(),
        );
        // Enums as maps of two entries (refused), and a unit variant with data.
        v.push(b"\x82\xa1B\x01\xa1A\xc0".to_vec());
        v.push(b"\xde\x00\x02\xa1A\xc0\xa1B\x01".to_vec());
        v.push(b"\x81\xa1A\x05".to_vec());
        // The add params as JavaScript (msgpackr) and Rust peers send them.
        v.push(b"\x82\xa1a\x01\xa1b\x02".to_vec());
        v.push(b"\x82\xa1a\xcb\x3f\xf8\0\0\0\0\0\0\xa1b\xd0\xfe".to_vec());
        v
    }

    fn corpus() -> Vec<Vec<u8>> {
        let mut r = Rng(0x9e37_79b9_7f4a_7c15);
        let mut c = Vec::new();
        for s in samples() {
            for cut in 0..s.len() {
                c.push(s[..cut].to_vec());
            }
            for _ in 0..4 {
                let mut m = s.clone();
                let at = r.below(m.len() as u64) as usize;
                m[at] = r.next() as u8;
                c.push(m);
            }
            c.push(s);
        }
        for _ in 0..3000 {
            let mut v = Vec::new();
            value(&mut r, 3, &mut v);
            c.push(v);
        }
        c
    }

    /// Checks `T` over the corpus; returns how many inputs the fast pass decoded itself.
    fn check<T>(corpus: &[Vec<u8>]) -> usize
    where
        T: for<'de> Deserialize<'de> + Debug,
    {
        let name = std::any::type_name::<T>();
        let mut fast = 0;
        for b in corpus {
            let want = rmp_serde::from_slice::<T>(b);
            match (&want, from_slice::<T>(b)) {
                (Ok(w), Ok(g)) => assert_eq!(format!("{w:?}"), format!("{g:?}"), "{name} {b:x?}"),
                (Err(w), Err(g)) => assert_eq!(w.to_string(), g.to_string(), "{name} {b:x?}"),
                (w, g) => panic!("{name} {b:x?}: rmp-serde {w:?}, Ferry {g:?}"),
            }
            if let Ok(v) = try_from_slice::<T>(b) {
                fast += 1;
                let Ok(w) = &want else {
                    panic!(
                        "{name} {b:x?}: the fast pass accepted what rmp-serde refuses: {want:?}"
                    );
                };
                assert_eq!(format!("{w:?}"), format!("{v:?}"), "{name} {b:x?}");
            }
        }
        fast
    }

    #[test]
    fn agrees_with_rmp_serde_on_every_type_and_input() {
        let c = corpus();
        let mut fast = Vec::new();
        macro_rules! types {
            ($($t:ty),* $(,)?) => {$( fast.push((stringify!($t), check::<$t>(&c))); )*};
        }
        types!(
            u8, u16, u32, u64, i8, i16, i32, i64, f32, f64, bool, char, String, (),
            Option<u32>, Option<Option<bool>>, Vec<i64>, Vec<u8>, serde_bytes::ByteBuf,
            (u8, String), [u16; 3], BTreeMap<String, i32>, BTreeMap<u32, bool>,
            rmpv::Value, serde_json::Value, serde::de::IgnoredAny, i128, u128,
            Pair, Defaults, Strict, Newtype, Tuple, Unit, E, Untagged, Tagged, Flat, Nested,
            Lenient,
        );
        // Every type decodes some inputs by itself, except the 128-bit integers, which it
        // leaves to rmp-serde (and `Lenient`, whose `a` it never decodes, only where `a` is
        // absent).
        for (t, n) in fast {
            if t == "i128" || t == "u128" {
                assert_eq!(n, 0, "{t}");
            } else {
                assert!(n > 0, "the fast pass decoded no {t} at all");
            }
        }
    }

    /// Where the type's own code swallowed the fast pass giving up, the pass had not consumed
    /// the value it gave up on: the whole input goes to rmp-serde, not the pass's guess.
    #[test]
    fn a_swallowed_give_up_still_goes_to_rmp_serde() {
        let b = b"\x82\xa1a\x01\xa1b\x02";
        assert_eq!(try_from_slice::<Lenient>(b).map(|_| ()), Err(bail()));
        let v: Lenient = from_slice(b).unwrap();
        assert_eq!((v.a, v.b), (Some(1), Some(2)));
        // And a give-up swallowed in one decode does not spill into the next.
        let p: Pair = try_from_slice(b"\x82\xa1a\x01\xa1b\x02").unwrap();
        assert_eq!((p.a, p.b), (1.0, 2.0));
    }

    #[test]
    fn decodes_the_common_shapes_itself_and_borrows_strings() {
        let p: Pair = try_from_slice(b"\x82\xa1a\x01\xa1b\xcb\x40\x04\0\0\0\0\0\0").unwrap();
        assert_eq!((p.a, p.b), (1.0, 2.5));
        assert_eq!(try_from_slice::<f64>(b"\x03"), Ok(3.0));
        assert_eq!(
            try_from_slice::<i64>(b"\xd3\xff\xff\xff\xff\xff\xff\xff\xfe"),
            Ok(-2)
        );
        let s: &str = try_from_slice(b"\xa3abc").unwrap();
        assert_eq!(s, "abc");
        let b: &[u8] = try_from_slice(b"\xc4\x02\x01\x02").unwrap();
        assert_eq!(b, [1, 2]);
        // Ext types are rmp-serde's, and still decode through `from_slice`.
        assert_eq!(try_from_slice::<rmpv::Value>(b"\xd4\x01\x09"), Err(bail()));
        let ext: rmpv::Value = from_slice(b"\xd4\x01\x09").unwrap();
        assert_eq!(ext, rmpv::Value::Ext(1, vec![9]));
        // Nesting beyond the fast pass's limit goes to rmp-serde, which refuses 1,024 levels.
        // (On a thread with room for the recursion of an unoptimized build.)
        std::thread::Builder::new()
            .stack_size(512 << 20)
            .spawn(|| {
                let deep = |n: usize| [vec![0x91; n], vec![0xc0]].concat();
                assert!(try_from_slice::<serde::de::IgnoredAny>(&deep(MAX_DEPTH as usize)).is_ok());
                assert_eq!(
                    try_from_slice::<serde::de::IgnoredAny>(&deep(MAX_DEPTH as usize + 1)),
                    Err(bail())
                );
                // The fallback refuses the same depth, before rmp-serde (which would take up
                // to 1,023 levels) sees it.
                let e = from_slice::<serde::de::IgnoredAny>(&deep(MAX_DEPTH as usize + 1));
                assert!(matches!(
                    e,
                    Err(rmp_serde::decode::Error::DepthLimitExceeded)
                ));
                assert!(from_slice::<serde::de::IgnoredAny>(&deep(1000)).is_err());
                // Within the limit, a value the fast pass gives up on for another reason (an
                // ext type at the bottom) still goes to rmp-serde.
                let ext = [vec![0x91; MAX_DEPTH as usize], vec![0xd4, 0x01, 0x09]].concat();
                assert!(try_from_slice::<rmpv::Value>(&ext).is_err());
                assert!(from_slice::<rmpv::Value>(&ext).is_ok());
            })
            .unwrap()
            .join()
            .unwrap();
    }

    /// Nesting depth of a decoded value: a scalar 0, `[[1]]` 2.
    fn reference_depth(v: &rmpv::Value) -> usize {
        match v {
            rmpv::Value::Array(items) => 1 + items.iter().map(reference_depth).max().unwrap_or(0),
            rmpv::Value::Map(entries) => {
                1 + entries
                    .iter()
                    .map(|(k, v)| reference_depth(k).max(reference_depth(v)))
                    .max()
                    .unwrap_or(0)
            }
            _ => 0,
        }
    }

    #[test]
    fn the_fallback_depth_check_measures_nesting_as_a_decoder_does() {
        let cases: [(&[u8], usize); 8] = [
            (b"\x01", 0),
            (b"\x90", 1),
            (b"\x91\x91\x01", 2),
            (b"\x92\x91\x01\x91\x01", 2),
            (b"\x92\x90\x91\x90", 3),
            (b"\x81\xa1k\x90", 2),
            (b"\x82\xa1a\x91\x01\xa1b\x02", 2),
            (b"\xdc\x00\x02\xc4\x01\x00\x81\x01\x91\x90", 4),
        ];
        for (bytes, depth) in cases {
            assert!(
                nests_as_deep_as(bytes, depth.max(1)) == (depth >= 1),
                "{bytes:x?}"
            );
            assert!(!nests_as_deep_as(bytes, depth + 1), "{bytes:x?}");
        }
        // Malformed or cut short: not deep, whatever the lengths claim.
        for bytes in [
            &b"\x92\x91"[..],
            b"\xdd\xff\xff\xff\xff",
            b"\xdf\xff\xff\xff\xff\x01",
            b"\xc6\xff\xff\xff\xff",
        ] {
            assert!(!nests_as_deep_as(bytes, 1_000), "{bytes:x?}");
        }
        // Against a decoder over the corpus (random, cut and mutated values).
        for b in corpus() {
            let Ok(v) = rmpv::decode::read_value(&mut &b[..]) else {
                continue;
            };
            let d = reference_depth(&v);
            for limit in 1..=d + 1 {
                assert_eq!(nests_as_deep_as(&b, limit), d >= limit, "{b:x?} at {limit}");
            }
        }
    }
}

#[cfg(test)]
mod depth_tests {
    use super::*;

    /// A recursive enum, as a function's params might be.
    #[derive(serde::Deserialize, Debug, PartialEq)]
    enum Nest {
        Leaf,
        Node(Box<Nest>),
    }

    /// `{"Node": {"Node": ... "Leaf"}}`, `levels` maps deep.
    fn nest(levels: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for _ in 0..levels {
            out.extend_from_slice(b"\x81\xa4Node");
        }
        out.extend_from_slice(b"\xa4Leaf");
        out
    }

    fn depth(mut n: &Nest) -> usize {
        let mut d = 0;
        while let Nest::Node(inner) = n {
            n = inner;
            d += 1;
        }
        d
    }

    /// Each level of enum nesting recursed in both decoders with no limit, so a frame of a few
    /// hundred KiB overflowed the stack of the thread decoding it: the process died. Now
    /// nesting counts for the fast pass's limit like arrays and maps, and the fallback refuses
    /// values nested as deep as rmp-serde refuses arrays and maps.
    #[test]
    fn deeply_nested_enums_are_refused_not_a_stack_overflow() {
        // A thread's default stack, as the worker's reader threads have.
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(|| {
                let e = from_slice::<Nest>(&nest(100_000)).unwrap_err();
                assert!(
                    matches!(e, rmp_serde::decode::Error::DepthLimitExceeded),
                    "{e}"
                );
                assert!(from_slice::<Nest>(&nest(MAX_DEPTH as usize + 1)).is_err());
                // Shallow values still decode, in the fast pass.
                let n: Nest = try_from_slice(&nest(20)).unwrap();
                assert_eq!(depth(&n), 20);
            })
            .unwrap()
            .join()
            .unwrap();
    }

    /// Up to the limit, enums decode, in either build on a thread's default stack.
    #[test]
    fn enums_nested_up_to_the_limit_decode() {
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(|| {
                // `nest(n)` is n maps deep, and its Leaf a variant one deeper.
                let levels = MAX_DEPTH as usize - 1;
                let n: Nest = try_from_slice(&nest(levels)).unwrap();
                assert_eq!(depth(&n), levels);
                let e = from_slice::<Nest>(&nest(MAX_DEPTH as usize + 1)).unwrap_err();
                assert!(matches!(e, rmp_serde::decode::Error::DepthLimitExceeded));
            })
            .unwrap()
            .join()
            .unwrap();
    }
}

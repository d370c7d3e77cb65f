//! A read-only view of raw BTF (the format of `/sys/kernel/btf/vmlinux`, described in the
//! kernel's Documentation/bpf/btf.rst), answering the few questions the daemon asks: a named
//! type's id, a member's offset and size, an enum's values.
//!
//! Why not a general BTF library: the daemon asks a dozen questions once at start, and the
//! libraries build every one of the kernel's ~150,000 types into owned structures first
//! (btfparse took 60 MB for a 5.5 MB file, over the daemon's whole memory target). This view
//! keeps the file's bytes and one offset per type id, and decodes a record when asked.

use anyhow::{Context as _, anyhow, bail, ensure};

const MAGIC: u16 = 0xeb9f;
/// The fixed part of every type record: name_off, info, size_or_type.
const RECORD: usize = 12;
/// Typedef and qualifier chains are short; a longer one means a loop in corrupt data.
const MAX_DEPTH: usize = 32;

/// BTF kinds (`BTF_KIND_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Kind {
    Int = 1,
    Ptr = 2,
    Array = 3,
    Struct = 4,
    Union = 5,
    Enum = 6,
    Fwd = 7,
    Typedef = 8,
    Volatile = 9,
    Const = 10,
    Restrict = 11,
    Func = 12,
    FuncProto = 13,
    Var = 14,
    DataSec = 15,
    Float = 16,
    DeclTag = 17,
    TypeTag = 18,
    Enum64 = 19,
}

impl Kind {
    fn from_info(info: u32) -> Option<Kind> {
        Some(match (info >> 24) & 0x1f {
            1 => Kind::Int,
            2 => Kind::Ptr,
            3 => Kind::Array,
            4 => Kind::Struct,
            5 => Kind::Union,
            6 => Kind::Enum,
            7 => Kind::Fwd,
            8 => Kind::Typedef,
            9 => Kind::Volatile,
            10 => Kind::Const,
            11 => Kind::Restrict,
            12 => Kind::Func,
            13 => Kind::FuncProto,
            14 => Kind::Var,
            15 => Kind::DataSec,
            16 => Kind::Float,
            17 => Kind::DeclTag,
            18 => Kind::TypeTag,
            19 => Kind::Enum64,
            _ => return None,
        })
    }

    /// Bytes that follow the fixed record of `info`'s kind and entry count.
    fn extra_len(self, info: u32) -> usize {
        let vlen = vlen(info);
        match self {
            Kind::Int | Kind::Var | Kind::DeclTag => 4,
            Kind::Array => 12,
            Kind::Struct | Kind::Union | Kind::DataSec | Kind::Enum64 => 12 * vlen,
            Kind::Enum | Kind::FuncProto => 8 * vlen,
            _ => 0,
        }
    }
}

/// One type record.
#[derive(Debug, Clone, Copy)]
pub struct Type<'a> {
    pub kind: Kind,
    name_off: u32,
    /// `vlen` (entries that follow) in the low 16 bits, kind flag in bit 31.
    info: u32,
    /// The size (ints, structs, unions, enums) or the referred type (pointers, typedefs, ...).
    size_or_type: u32,
    extra: &'a [u8],
}

/// Entries that follow a record (`vlen`, the low 16 bits of `info`).
fn vlen(info: u32) -> usize {
    (info & 0xffff) as usize
}

impl Type<'_> {
    fn kind_flag(&self) -> bool {
        self.info >> 31 == 1
    }

    /// A struct or union with members (not a forward declaration's empty shell).
    pub fn is_complete_struct(&self) -> bool {
        matches!(self.kind, Kind::Struct | Kind::Union) && vlen(self.info) > 0
    }
}

/// Where a member (or a member path) is: its type and bit offset, and its width if a bitfield.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Located {
    pub type_id: u32,
    pub bit_offset: u32,
    pub bitfield_bits: u32,
}

pub struct Btf {
    data: Vec<u8>,
    types: std::ops::Range<usize>,
    strings: std::ops::Range<usize>,
    /// Byte offset in `data` of type id `i + 1` (id 0 is `void`).
    index: Vec<u32>,
}

impl Btf {
    /// Checks the header and indexes the type records of raw little-endian BTF.
    pub fn parse(data: Vec<u8>) -> anyhow::Result<Btf> {
        let u16_at = |at: usize| {
            data.get(at..at + 2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
        };
        match u16_at(0) {
            Some(MAGIC) => {}
            Some(0x9feb) => bail!("big-endian BTF is not supported"),
            _ => bail!("not raw BTF (no 0xeb9f magic)"),
        }
        let header = |n: usize| read_u32(&data, 4 + 4 * n).context("truncated BTF header");
        let hdr_len = header(0)? as usize;
        let section = |off: u32, len: u32| -> anyhow::Result<std::ops::Range<usize>> {
            let start = hdr_len
                .checked_add(off as usize)
                .context("BTF section offset overflows")?;
            let end = start
                .checked_add(len as usize)
                .context("BTF section length overflows")?;
            ensure!(
                end <= data.len(),
                "BTF section runs past the end of the file"
            );
            Ok(start..end)
        };
        let types = section(header(1)?, header(2)?)?;
        let strings = section(header(3)?, header(4)?)?;
        let mut index = Vec::new();
        let mut at = types.start;
        while at < types.end {
            let info = read_u32(&data, at + 4).context("truncated BTF type record")?;
            let kind = Kind::from_info(info)
                .ok_or_else(|| anyhow!("unknown BTF kind {} at byte {at}", (info >> 24) & 0x1f))?;
            index.push(at as u32);
            at += RECORD + kind.extra_len(info);
        }
        ensure!(
            at == types.end,
            "the last BTF type record runs past its section"
        );
        Ok(Btf {
            data,
            types,
            strings,
            index,
        })
    }

    /// The type with id `id` (None for `void`, 0, and ids beyond the last).
    pub fn get(&self, id: u32) -> Option<Type<'_>> {
        let at = *self.index.get((id as usize).checked_sub(1)?)? as usize;
        let info = read_u32(&self.data, at + 4)?;
        let kind = Kind::from_info(info)?;
        let extra_end = (at + RECORD + kind.extra_len(info)).min(self.types.end);
        Some(Type {
            kind,
            name_off: read_u32(&self.data, at)?,
            info,
            size_or_type: read_u32(&self.data, at + 8)?,
            extra: &self.data[at + RECORD..extra_end],
        })
    }

    /// The string at `offset` of the string section ("" when out of range).
    fn string(&self, offset: u32) -> &str {
        let strings = &self.data[self.strings.clone()];
        let Some(rest) = strings.get(offset as usize..) else {
            return "";
        };
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    pub fn name(&self, ty: &Type<'_>) -> &str {
        self.string(ty.name_off)
    }

    /// The first type named `name` that `wanted` accepts. Names are not unique (a struct and a
    /// function may share one, and forward declarations repeat a struct's name).
    pub fn find(&self, name: &str, wanted: impl Fn(&Type<'_>) -> bool) -> Option<u32> {
        (1..=self.index.len() as u32).find(|&id| {
            self.get(id)
                .is_some_and(|ty| wanted(&ty) && self.name(&ty) == name)
        })
    }

    /// Follows typedefs and qualifiers to the type they name.
    fn resolve(&self, mut id: u32) -> anyhow::Result<(u32, Type<'_>)> {
        for _ in 0..MAX_DEPTH {
            let ty = self.get(id).ok_or_else(|| anyhow!("no BTF type {id}"))?;
            match ty.kind {
                Kind::Typedef | Kind::Volatile | Kind::Const | Kind::Restrict | Kind::TypeTag => {
                    id = ty.size_or_type
                }
                _ => return Ok((id, ty)),
            }
        }
        bail!("BTF type {id}: typedef chain too long")
    }

    /// Size in bytes of the type `id`.
    pub fn size_of(&self, id: u32) -> anyhow::Result<u32> {
        self.size_of_at(id, 0)
    }

    fn size_of_at(&self, id: u32, depth: usize) -> anyhow::Result<u32> {
        ensure!(depth < MAX_DEPTH, "BTF type {id}: nested too deep");
        let (id, ty) = self.resolve(id)?;
        match ty.kind {
            Kind::Int
            | Kind::Struct
            | Kind::Union
            | Kind::Enum
            | Kind::Enum64
            | Kind::Float
            | Kind::DataSec => Ok(ty.size_or_type),
            // The kernels this daemon runs on are 64-bit.
            Kind::Ptr => Ok(8),
            Kind::Array => {
                let element = read_u32(ty.extra, 0).context("truncated BTF array")?;
                let count = read_u32(ty.extra, 8).context("truncated BTF array")?;
                self.size_of_at(element, depth + 1)?
                    .checked_mul(count)
                    .ok_or_else(|| anyhow!("BTF array {id} is too large"))
            }
            other => bail!("BTF type {id} ({other:?}) has no size"),
        }
    }

    /// (name, place) of each member of a struct or union.
    fn members<'a>(&'a self, ty: &Type<'a>) -> impl Iterator<Item = (&'a str, Located)> + 'a {
        let bitfields = ty.kind_flag();
        ty.extra.chunks_exact(12).map(move |entry| {
            let offset = read_u32(entry, 8).unwrap_or(0);
            let (bit_offset, bitfield_bits) = if bitfields {
                (offset & 0x00ff_ffff, offset >> 24)
            } else {
                (offset, 0)
            };
            let place = Located {
                type_id: read_u32(entry, 4).unwrap_or(0),
                bit_offset,
                bitfield_bits,
            };
            (self.string(read_u32(entry, 0).unwrap_or(0)), place)
        })
    }

    /// Where `path` (member names joined by dots) ends inside the struct or union `id`.
    /// Anonymous structs and unions are looked into, as C does.
    pub fn offset_of(&self, id: u32, path: &str) -> anyhow::Result<Located> {
        let mut here = Located {
            type_id: id,
            bit_offset: 0,
            bitfield_bits: 0,
        };
        for name in path.split('.') {
            let found = self
                .member(here.type_id, name, 0)?
                .ok_or_else(|| anyhow!("no member `{name}`"))?;
            here = Located {
                bit_offset: add_bits(here.bit_offset, found.bit_offset)?,
                ..found
            };
        }
        Ok(here)
    }

    /// The member `name` of the struct or union `id`, searching anonymous members too.
    fn member(&self, id: u32, name: &str, depth: usize) -> anyhow::Result<Option<Located>> {
        ensure!(
            depth < MAX_DEPTH,
            "BTF type {id}: anonymous members nested too deep"
        );
        let (id, ty) = self.resolve(id)?;
        ensure!(
            matches!(ty.kind, Kind::Struct | Kind::Union),
            "BTF type {id} is a {:?}, not a struct or union",
            ty.kind
        );
        for (member, place) in self.members(&ty) {
            if member == name {
                return Ok(Some(place));
            }
            if member.is_empty()
                && let Ok((_, inner)) = self.resolve(place.type_id)
                && matches!(inner.kind, Kind::Struct | Kind::Union)
                && let Some(found) = self.member(place.type_id, name, depth + 1)?
            {
                return Ok(Some(Located {
                    bit_offset: add_bits(place.bit_offset, found.bit_offset)?,
                    ..found
                }));
            }
        }
        Ok(None)
    }

    /// (name, value) of each enumerator of the enum `id` (32-bit enums).
    pub fn enum_values(&self, id: u32) -> anyhow::Result<Vec<(String, u32)>> {
        let ty = self.get(id).ok_or_else(|| anyhow!("no BTF type {id}"))?;
        ensure!(ty.kind == Kind::Enum, "BTF type {id} is not an enum");
        Ok(ty
            .extra
            .chunks_exact(8)
            .map(|entry| {
                (
                    self.string(read_u32(entry, 0).unwrap_or(0)).to_string(),
                    read_u32(entry, 4).unwrap_or(0),
                )
            })
            .collect())
    }
}

/// An outer and an inner bit offset added; corrupt data could overflow.
fn add_bits(outer: u32, inner: u32) -> anyhow::Result<u32> {
    outer
        .checked_add(inner)
        .ok_or_else(|| anyhow!("member offset overflows"))
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Raw BTF built by hand: `struct outer { int a; union { long b; char c; }; unsigned d:3; }`
    /// (the bitfield in a kind-flag struct), `typedef struct outer outer_t;`, `int x[4]`, and
    /// `enum e { E0 = 0, E7 = 7 }`.
    fn sample() -> Vec<u8> {
        let mut strings = vec![0u8];
        let mut name = |s: &str| {
            let at = strings.len() as u32;
            strings.extend_from_slice(s.as_bytes());
            strings.push(0);
            at
        };
        let (int, long, char_, outer, a, b, c, d, outer_t, e, e0, e7) = (
            name("int"),
            name("long"),
            name("char"),
            name("outer"),
            name("a"),
            name("b"),
            name("c"),
            name("d"),
            name("outer_t"),
            name("e"),
            name("E0"),
            name("E7"),
        );
        let mut types = Vec::new();
        let mut push = |words: &[u32]| {
            for w in words {
                types.extend_from_slice(&w.to_le_bytes());
            }
        };
        let info = |kind: u32, vlen: u32, flag: bool| (u32::from(flag) << 31) | (kind << 24) | vlen;
        push(&[int, info(1, 0, false), 4, 32]); // 1: int
        push(&[long, info(1, 0, false), 8, 64]); // 2: long
        push(&[char_, info(1, 0, false), 1, 8]); // 3: char
        push(&[0, info(5, 2, false), 8, b, 2, 0, c, 3, 0]); // 4: anonymous union
        push(&[outer, info(4, 3, true), 24]); // 5: struct outer
        push(&[a, 1, 0, 0, 4, 64, d, 1, (3 << 24) | 128]);
        push(&[outer_t, info(8, 0, false), 5]); // 6: typedef
        push(&[0, info(3, 0, false), 0, 1, 1, 4]); // 7: int[4]
        push(&[e, info(6, 2, false), 4, e0, 0, e7, 7]); // 8: enum e
        let mut data = Vec::new();
        data.extend_from_slice(&MAGIC.to_le_bytes());
        data.extend_from_slice(&[1, 0]);
        for word in [
            24,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            data.extend_from_slice(&word.to_le_bytes());
        }
        data.extend_from_slice(&types);
        data.extend_from_slice(&strings);
        data
    }

    #[test]
    fn finds_types_members_sizes_and_enums() {
        let btf = Btf::parse(sample()).unwrap();
        let outer = btf.find("outer", |t| t.is_complete_struct()).unwrap();
        assert_eq!(outer, 5);
        assert_eq!(btf.size_of(outer).unwrap(), 24);
        assert_eq!(btf.size_of(6).unwrap(), 24, "through the typedef");
        assert_eq!(btf.size_of(7).unwrap(), 16, "int[4]");
        let b = btf.offset_of(6, "b").unwrap();
        assert_eq!((b.type_id, b.bit_offset, b.bitfield_bits), (2, 64, 0));
        assert_eq!(btf.size_of(b.type_id).unwrap(), 8);
        let d = btf.offset_of(outer, "d").unwrap();
        assert_eq!((d.bit_offset, d.bitfield_bits), (128, 3));
        assert!(btf.offset_of(outer, "zz").is_err());
        assert!(btf.offset_of(outer, "a.b").is_err(), "int has no members");
        let e = btf.find("e", |t| t.kind == Kind::Enum).unwrap();
        assert_eq!(
            btf.enum_values(e).unwrap(),
            vec![("E0".to_string(), 0), ("E7".to_string(), 7)]
        );
        assert_eq!(btf.find("nothing", |_| true), None);
    }

    #[test]
    fn corrupt_data_is_an_error_not_a_panic() {
        let good = sample();
        assert!(Btf::parse(Vec::new()).is_err());
        assert!(Btf::parse(good[..30].to_vec()).is_err());
        for cut in 0..good.len() {
            let _ = Btf::parse(good[..cut].to_vec());
        }
        let mut flipped = good.clone();
        for at in 0..flipped.len() {
            flipped[at] ^= 0xff;
            if let Ok(btf) = Btf::parse(flipped.clone()) {
                for id in 0..12 {
                    let _ = btf.size_of(id);
                    let _ = btf.offset_of(id, "b");
                    let _ = btf.offset_of(id, "d.b");
                    let _ = btf.enum_values(id);
                }
            }
            flipped[at] ^= 0xff;
        }
    }
}

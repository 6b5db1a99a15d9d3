//! Just enough of the BPF Type Format to find struct member offsets in the kernel's own BTF
//! (`/sys/kernel/btf/vmlinux`).
//!
//! aya parses BTF too but keeps type lookup crate-private, and the one maintained stand-alone
//! parser is LGPL; finding a member offset needs a hundred lines, so they live here.
use std::{collections::HashMap, path::Path};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum BtfError {
    #[error("cannot read kernel BTF at {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel BTF is malformed: {0}")]
    Malformed(&'static str),
    #[error("kernel BTF has no struct {0}")]
    NoStruct(String),
    #[error("kernel BTF has no member {member} in struct {strukt}")]
    NoMember { strukt: String, member: String },
    #[error("member {strukt}.{member} is a bitfield, not addressable")]
    Bitfield { strukt: String, member: String },
}

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, Clone, Copy)]
struct Member {
    name_off: u32,
    type_id: u32,
    /// Raw `offset` word; its meaning depends on the struct's kind_flag.
    offset: u32,
}

#[derive(Debug, Clone)]
struct Type {
    name_off: u32,
    kind: u32,
    kind_flag: bool,
    /// `size` or `type`, depending on the kind.
    size_or_type: u32,
    members: Vec<Member>,
}

/// A parsed BTF blob: its types (index = type id − 1) and string section.
pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
    structs_by_name: HashMap<String, u32>,
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, BtfError> {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or(BtfError::Malformed("truncated"))
}

impl Btf {
    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&data)
    }

    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        let magic = data
            .get(0..2)
            .map(|m| u16::from_le_bytes([m[0], m[1]]))
            .ok_or(BtfError::Malformed("truncated header"))?;
        if magic != MAGIC {
            return Err(BtfError::Malformed("bad magic (not little-endian BTF)"));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let type_off = u32_at(data, 8)? as usize;
        let type_len = u32_at(data, 12)? as usize;
        let str_off = u32_at(data, 16)? as usize;
        let str_len = u32_at(data, 20)? as usize;
        let type_sec = data
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or(BtfError::Malformed("type section out of bounds"))?;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(BtfError::Malformed("string section out of bounds"))?
            .to_vec();

        let mut types = Vec::new();
        let mut at = 0;
        while at < type_sec.len() {
            let name_off = u32_at(type_sec, at)?;
            let info = u32_at(type_sec, at + 4)?;
            let size_or_type = u32_at(type_sec, at + 8)?;
            at += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let mut members = Vec::new();
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
                | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = at + i * 12;
                        members.push(Member {
                            name_off: u32_at(type_sec, m)?,
                            type_id: u32_at(type_sec, m + 4)?,
                            offset: u32_at(type_sec, m + 8)?,
                        });
                    }
                    vlen * 12
                }
                KIND_ENUM | KIND_FUNC_PROTO => vlen * 8,
                KIND_DATASEC | KIND_ENUM64 => vlen * 12,
                _ => return Err(BtfError::Malformed("unknown type kind")),
            };
            at += extra;
            types.push(Type {
                name_off,
                kind,
                kind_flag,
                size_or_type,
                members,
            });
        }

        let mut btf = Self {
            types,
            strings,
            structs_by_name: HashMap::new(),
        };
        for (idx, t) in btf.types.iter().enumerate() {
            if t.kind == KIND_STRUCT && t.name_off != 0 {
                let name = btf.string(t.name_off).to_owned();
                btf.structs_by_name.entry(name).or_insert(idx as u32 + 1);
            }
        }
        Ok(btf)
    }

    fn string(&self, off: u32) -> &str {
        let rest = self.strings.get(off as usize..).unwrap_or(&[]);
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    fn type_by_id(&self, id: u32) -> Option<&Type> {
        id.checked_sub(1).and_then(|i| self.types.get(i as usize))
    }

    /// Follows typedefs and qualifiers to the underlying type.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let t = self.type_by_id(id)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type
                }
                _ => return Some(t),
            }
        }
        None
    }

    /// Byte offset of `member` in `struct strukt`, looking through anonymous structs and
    /// unions as C does.
    pub fn member_offset(&self, strukt: &str, member: &str) -> Result<u32, BtfError> {
        let id = *self
            .structs_by_name
            .get(strukt)
            .ok_or_else(|| BtfError::NoStruct(strukt.to_owned()))?;
        let t = self
            .type_by_id(id)
            .ok_or(BtfError::Malformed("dangling struct id"))?;
        match self.find_member(t, member, 0) {
            Some((bits, false)) if bits % 8 == 0 => Ok(bits / 8),
            Some(_) => Err(BtfError::Bitfield {
                strukt: strukt.to_owned(),
                member: member.to_owned(),
            }),
            None => Err(BtfError::NoMember {
                strukt: strukt.to_owned(),
                member: member.to_owned(),
            }),
        }
    }

    /// Bit offset of `member` inside `t`, plus `base`, and whether it is a bitfield.
    fn find_member(&self, t: &Type, member: &str, base: u32) -> Option<(u32, bool)> {
        for m in &t.members {
            let bit_off = if t.kind_flag {
                m.offset & 0x00ff_ffff
            } else {
                m.offset
            };
            if m.name_off == 0 {
                if let Some(inner) = self.resolve(m.type_id)
                    && matches!(inner.kind, KIND_STRUCT | KIND_UNION)
                    && let Some(found) = self.find_member(inner, member, base + bit_off)
                {
                    return Some(found);
                }
            } else if self.string(m.name_off) == member {
                let bitfield = t.kind_flag && m.offset >> 24 != 0;
                return Some((base + bit_off, bitfield));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a BTF blob: `struct inner { int a; int b; }` and
    /// `struct outer { long x; union { struct inner in; int z; }; }`.
    fn sample() -> Vec<u8> {
        let strings = b"\0int\0a\0b\0inner\0outer\0x\0in\0z\0long\0";
        let s = |name: &str| -> u32 {
            let needle = format!("\0{name}\0");
            strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .map(|p| p as u32 + 1)
                .unwrap()
        };
        let mut types = Vec::new();
        let push = |types: &mut Vec<u8>, words: &[u32]| {
            for w in words {
                types.extend_from_slice(&w.to_le_bytes());
            }
        };
        // 1: int
        push(&mut types, &[s("int"), KIND_INT << 24, 4, 32]);
        // 2: long
        push(&mut types, &[s("long"), KIND_INT << 24, 8, 64]);
        // 3: struct inner { int a @0; int b @32 }
        push(&mut types, &[s("inner"), KIND_STRUCT << 24 | 2, 8]);
        push(&mut types, &[s("a"), 1, 0, s("b"), 1, 32]);
        // 4: anonymous union { struct inner in; int z; }
        push(&mut types, &[0, KIND_UNION << 24 | 2, 8]);
        push(&mut types, &[s("in"), 3, 0, s("z"), 1, 0]);
        // 5: const union (qualifier to look through)
        push(&mut types, &[0, KIND_CONST << 24, 4]);
        // 6: struct outer { long x @0; <anon> @64 }
        push(&mut types, &[s("outer"), KIND_STRUCT << 24 | 2, 16]);
        push(&mut types, &[s("x"), 2, 0, 0, 5, 64]);

        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.push(1);
        out.push(0);
        for w in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&types);
        out.extend_from_slice(strings);
        out
    }

    #[test]
    fn finds_direct_and_anonymous_members() {
        let btf = Btf::parse(&sample()).unwrap();
        assert_eq!(btf.member_offset("inner", "b").unwrap(), 4);
        assert_eq!(btf.member_offset("outer", "x").unwrap(), 0);
        assert_eq!(btf.member_offset("outer", "z").unwrap(), 8);
        assert_eq!(btf.member_offset("outer", "in").unwrap(), 8);
    }

    #[test]
    fn reports_missing_struct_and_member() {
        let btf = Btf::parse(&sample()).unwrap();
        assert!(matches!(
            btf.member_offset("nope", "a"),
            Err(BtfError::NoStruct(_))
        ));
        assert!(matches!(
            btf.member_offset("inner", "c"),
            Err(BtfError::NoMember { .. })
        ));
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(Btf::parse(b"hello"), Err(BtfError::Malformed(_))));
        let mut truncated = sample();
        truncated.truncate(40);
        assert!(matches!(
            Btf::parse(&truncated),
            Err(BtfError::Malformed(_))
        ));
    }

    #[test]
    fn reads_this_kernels_task_struct() {
        // reclaimd requires a kernel with BTF, and so do its tests.
        let btf = Btf::from_file(Path::new("/sys/kernel/btf/vmlinux")).unwrap();
        let pid = btf.member_offset("task_struct", "pid").unwrap();
        let tgid = btf.member_offset("task_struct", "tgid").unwrap();
        assert_eq!(tgid, pid + 4, "pid and tgid are adjacent pid_t fields");
        assert!(btf.member_offset("socket", "sk").unwrap() > 0);
    }
}

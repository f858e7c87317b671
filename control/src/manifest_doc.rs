//! One YAML document of a manifest file, read with a `List`'s `items`
//! handed out one at a time.
//!
//! Why not `serde_yaml::Value` for the whole document: `kubectl get ... -o
//! yaml` writes a whole cluster as one `kind: List` document, and as a
//! `Value` tree that document costs many times its text (a 14 MB List of
//! 10,000 services took lightpath to 530 MB). Here each element of a
//! top-level `items` sequence is read into a `Value` of its own and handed to
//! the caller, who converts it and drops it before the next one is read.
//! The rest of the document (`kind`, `apiVersion`, `metadata`) is small and
//! kept as a mapping, because in kubectl's output `kind` comes after `items`
//! (keys sorted), so a document is known to be a List only at its end.

use std::fmt;

use serde::de::{
    DeserializeSeed, Deserializer, EnumAccess, Error as _, IgnoredAny, MapAccess, SeqAccess,
    VariantAccess, Visitor,
};
use serde_yaml::{Mapping, Value};

/// What a document's top-level `items` key held.
#[derive(Debug, Default, PartialEq)]
pub(crate) enum Items {
    /// No `items` key.
    #[default]
    Absent,
    /// `items: null`.
    Null,
    /// A sequence: its elements went to the item callback; those it handed
    /// back (with their index) are here.
    Streamed(Vec<(usize, Value)>),
    /// Anything else (a scalar or mapping), not kept.
    Other,
}

/// A document's top level.
#[derive(Debug, PartialEq)]
pub(crate) enum Document {
    /// An empty document (a trailing `---`) or `null`.
    Null,
    /// A scalar, sequence or tagged value: not an object.
    NotMapping,
    /// A mapping: every key but `items`, and what `items` held.
    Mapping { rest: Mapping, items: Items },
}

/// Reads one document. `on_item(index, element)` receives each element of a
/// top-level `items` sequence as soon as it is parsed; it returns the
/// element back (`Some`) to have it kept in [`Items::Streamed`].
pub(crate) fn read<'de, D, F>(de: D, on_item: &mut F) -> Result<Document, D::Error>
where
    D: Deserializer<'de>,
    F: FnMut(usize, Value) -> Option<Value> + ?Sized,
{
    de.deserialize_any(TopVisitor { on_item })
}

struct TopVisitor<'a, F: ?Sized> {
    on_item: &'a mut F,
}

impl<'de, F: FnMut(usize, Value) -> Option<Value> + ?Sized> Visitor<'de> for TopVisitor<'_, F> {
    type Value = Document;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a Kubernetes object or List")
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Document, E> {
        Ok(Document::Null)
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<Document, E> {
        Ok(Document::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, de: D) -> Result<Document, D::Error> {
        de.deserialize_any(self)
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Document, E> {
        Ok(Document::NotMapping)
    }

    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Document, E> {
        Ok(Document::NotMapping)
    }

    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Document, E> {
        Ok(Document::NotMapping)
    }

    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Document, E> {
        Ok(Document::NotMapping)
    }

    fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<Document, E> {
        Ok(Document::NotMapping)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Document, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Document::NotMapping)
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Document, A::Error> {
        // A tagged value (`!Tag ...`).
        let (IgnoredAny, variant) = data.variant::<IgnoredAny>()?;
        variant.newtype_variant::<IgnoredAny>()?;
        Ok(Document::NotMapping)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Document, A::Error> {
        let mut rest = Mapping::new();
        let mut items = Items::Absent;
        while let Some(key) = map.next_key::<Value>()? {
            let duplicate = if key.as_str() == Some("items") {
                items != Items::Absent
            } else {
                rest.contains_key(&key)
            };
            if duplicate {
                // serde_yaml's own Value rejects these the same way.
                return Err(A::Error::custom(format_args!(
                    "duplicate entry with key {}",
                    serde_yaml::to_string(&key).unwrap_or_default().trim_end()
                )));
            }
            if key.as_str() == Some("items") {
                items = map.next_value_seed(ItemsSeed {
                    on_item: &mut *self.on_item,
                })?;
            } else {
                let value: Value = map.next_value()?;
                rest.insert(key, value);
            }
        }
        Ok(Document::Mapping { rest, items })
    }
}

struct ItemsSeed<'a, F: ?Sized> {
    on_item: &'a mut F,
}

impl<'de, F: FnMut(usize, Value) -> Option<Value> + ?Sized> DeserializeSeed<'de>
    for ItemsSeed<'_, F>
{
    type Value = Items;

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Items, D::Error> {
        de.deserialize_any(self)
    }
}

impl<'de, F: FnMut(usize, Value) -> Option<Value> + ?Sized> Visitor<'de> for ItemsSeed<'_, F> {
    type Value = Items;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a sequence of objects")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Items, A::Error> {
        let mut held = Vec::new();
        let mut i = 0;
        while let Some(item) = seq.next_element::<Value>()? {
            if let Some(item) = (self.on_item)(i, item) {
                held.push((i, item));
            }
            i += 1;
        }
        Ok(Items::Streamed(held))
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Items, E> {
        Ok(Items::Null)
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<Items, E> {
        Ok(Items::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, de: D) -> Result<Items, D::Error> {
        de.deserialize_any(self)
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Items, E> {
        Ok(Items::Other)
    }

    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Items, E> {
        Ok(Items::Other)
    }

    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Items, E> {
        Ok(Items::Other)
    }

    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Items, E> {
        Ok(Items::Other)
    }

    fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<Items, E> {
        Ok(Items::Other)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Items, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Items::Other)
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Items, A::Error> {
        let (IgnoredAny, variant) = data.variant::<IgnoredAny>()?;
        variant.newtype_variant::<IgnoredAny>()?;
        Ok(Items::Other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads every document of `text`; the callback keeps items whose
    /// `name` is "keep" and records the names it saw, in order.
    fn docs(text: &str) -> (Vec<Result<Document, String>>, Vec<String>) {
        let mut seen = Vec::new();
        let mut out = Vec::new();
        for de in serde_yaml::Deserializer::from_str(text) {
            let mut on_item = |i: usize, v: Value| {
                let name = v.get("name").and_then(Value::as_str).unwrap_or("?");
                seen.push(format!("{i}:{name}"));
                (name == "keep").then_some(v)
            };
            let r = read(de, &mut on_item).map_err(|e| e.to_string());
            let stop = r.is_err();
            out.push(r);
            if stop {
                break;
            }
        }
        (out, seen)
    }

    #[test]
    fn list_items_are_handed_out_in_order_and_the_rest_kept() {
        // kubectl's key order: items before kind.
        let (d, seen) = docs(
            "apiVersion: v1\nitems:\n- {name: a}\n- {name: keep}\n- {name: c}\nkind: List\nmetadata: {}\n",
        );
        assert_eq!(seen, ["0:a", "1:keep", "2:c"]);
        let Ok(Document::Mapping { rest, items }) = &d[0] else {
            panic!("{d:?}")
        };
        assert_eq!(rest.get("kind").and_then(Value::as_str), Some("List"));
        assert!(rest.get("items").is_none());
        assert_eq!(rest.len(), 3);
        let Items::Streamed(held) = items else {
            panic!("{items:?}")
        };
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].0, 1);
    }

    #[test]
    fn non_mappings_nulls_and_odd_items() {
        let (d, _) = docs("---\n---\n42\n---\n[1, 2]\n---\n!Tag {a: 1}\n---\nkind: List\nitems: null\n---\nitems: {a: 1}\n---\nitems: 3\n");
        let d: Vec<_> = d.into_iter().map(Result::unwrap).collect();
        assert_eq!(d[0], Document::Null);
        assert_eq!(d[1], Document::NotMapping);
        assert_eq!(d[2], Document::NotMapping);
        assert_eq!(d[3], Document::NotMapping);
        assert!(matches!(
            &d[4],
            Document::Mapping {
                items: Items::Null,
                ..
            }
        ));
        assert!(matches!(
            &d[5],
            Document::Mapping {
                items: Items::Other,
                ..
            }
        ));
        assert!(matches!(
            &d[6],
            Document::Mapping {
                items: Items::Other,
                ..
            }
        ));
    }

    #[test]
    fn duplicate_keys_are_errors_like_serde_yaml_value() {
        let (d, _) = docs("kind: List\nkind: List\n");
        assert!(
            d[0].as_ref().unwrap_err().contains("duplicate entry"),
            "{d:?}"
        );
        let (d, _) = docs("items: []\nitems: []\n");
        assert!(
            d[0].as_ref().unwrap_err().contains("duplicate entry"),
            "{d:?}"
        );
        // The same text through serde_yaml's Value fails too.
        assert!(serde_yaml::from_str::<Value>("kind: List\nkind: List\n").is_err());
    }
}

//! FHIR R4 datatypes for type-aware masking: which datatype the element being read
//! has, known one step at a time from `resourceType` and the element names, so rules
//! written per datatype (`HumanName`, `Address.state`, `date`) apply wherever that
//! type occurs in any resource, in one streaming pass.
//!
//! * [`Model`]: the element table generated from the official R4 StructureDefinitions
//!   (`r4.table`, `cargo xtask fhir-table`; its header names the source and version).
//! * [`FhirRules`]: a profile's type rules and extension allow-list resolved against
//!   the model: one lookup per member name gives the child's type and its rule.
//!
//! Streaming needs `resourceType` before a resource's other members and an
//! extension's `url` before its value (as servers write them); otherwise those
//! members are masked by the profile's default (fail closed).

use std::sync::LazyLock;

use rustc_hash::{FxHashMap, FxHashSet};

pub type TypeId = u16;

/// No known type: the element is not in the model (or its resource type is unknown).
pub const UNKNOWN: TypeId = TypeId::MAX;

const NO_ELEMENT: u32 = u32::MAX;

/// The element table: types, their bases, and their elements' datatypes.
#[derive(Debug)]
pub struct Model {
    names: Vec<Box<str>>,
    ids: FxHashMap<Box<str>, TypeId>,
    base: Vec<TypeId>,
    /// Per type: member name -> (datatype, element id).
    elements: Vec<FxHashMap<Box<str>, (TypeId, u32)>>,
    /// Element id -> (owner type, name).
    element_names: Vec<(TypeId, Box<str>)>,
    /// Derives from `Resource` (a concrete resource type, or `Resource` itself).
    resource: Vec<bool>,
    pub(crate) any_resource: TypeId,
    pub(crate) extension: TypeId,
    pub(crate) element: TypeId,
}

static R4: LazyLock<Model> =
    LazyLock::new(|| Model::parse(include_str!("r4.table")).expect("the generated table parses"));

/// The R4 (4.0.1) model.
pub fn r4() -> &'static Model {
    &R4
}

impl Model {
    fn intern(&mut self, name: &str) -> TypeId {
        if let Some(id) = self.ids.get(name) {
            return *id;
        }
        let id = self.names.len() as TypeId;
        self.names.push(name.into());
        self.ids.insert(name.into(), id);
        self.base.push(UNKNOWN);
        self.elements.push(FxHashMap::default());
        self.resource.push(false);
        id
    }

    /// Parses the generated table (`T type base` / `E element type` lines).
    pub fn parse(text: &str) -> Result<Model, String> {
        let mut m = Model {
            names: Vec::new(),
            ids: FxHashMap::default(),
            base: Vec::new(),
            elements: Vec::new(),
            element_names: Vec::new(),
            resource: Vec::new(),
            any_resource: 0,
            extension: 0,
            element: 0,
        };
        let mut owner = None;
        for (n, line) in text.lines().enumerate() {
            let f: Vec<&str> = line.split('\t').collect();
            match f.as_slice() {
                [] | [""] => {}
                [c, ..] if c.starts_with('#') => {}
                ["T", name, base] => {
                    let t = m.intern(name);
                    let b = if base.is_empty() {
                        UNKNOWN
                    } else {
                        m.intern(base)
                    };
                    m.base[t as usize] = b;
                    owner = Some(t);
                }
                ["E", name, ty] => {
                    let o = owner.ok_or(format!("line {}: element before a type", n + 1))?;
                    let t = m.intern(ty);
                    let e = m.element_names.len() as u32;
                    m.element_names.push((o, (*name).into()));
                    m.elements[o as usize].insert((*name).into(), (t, e));
                }
                _ => {
                    return Err(format!(
                        "line {}: not `T type base` or `E name type`",
                        n + 1
                    ))
                }
            }
        }
        m.any_resource = m.intern("Resource");
        m.extension = m.intern("Extension");
        m.element = m.intern("Element");
        let resource: Vec<bool> = (0..m.names.len())
            .map(|t| m.bases(t as TypeId).any(|b| b == m.any_resource))
            .collect();
        m.resource = resource;
        Ok(m)
    }

    pub fn type_id(&self, name: &str) -> Option<TypeId> {
        self.ids.get(name).copied()
    }

    pub fn name(&self, t: TypeId) -> &str {
        self.names.get(t as usize).map_or("?", |n| n)
    }

    /// A concrete resource type by name.
    pub fn resource_type(&self, name: &str) -> Option<TypeId> {
        self.type_id(name)
            .filter(|t| *t != self.any_resource && self.resource[*t as usize])
    }

    pub fn is_resource(&self, t: TypeId) -> bool {
        t != UNKNOWN && self.resource[t as usize]
    }

    /// `t`, its base, its base's base...
    pub fn bases(&self, t: TypeId) -> impl Iterator<Item = TypeId> + '_ {
        std::iter::successors(Some(t), |b| {
            let n = self.base[*b as usize];
            (n != UNKNOWN && n != *b).then_some(n)
        })
        .take(16)
    }

    /// The element `name` of type `owner` (its own or inherited in the snapshot).
    pub fn element(&self, owner: TypeId, name: &str) -> Option<(TypeId, u32)> {
        self.elements.get(owner as usize)?.get(name).copied()
    }

    pub fn element_count(&self) -> usize {
        self.element_names.len()
    }

    pub fn type_count(&self) -> usize {
        self.names.len()
    }

    /// The elements of type `t`: name and datatype.
    pub fn elements(&self, t: TypeId) -> impl Iterator<Item = (&str, TypeId)> + '_ {
        let mut v: Vec<(&str, TypeId)> = self.elements[t as usize]
            .iter()
            .map(|(k, (ty, _))| (&**k, *ty))
            .collect();
        v.sort_unstable();
        v.into_iter()
    }

    /// Every concrete resource type.
    pub fn resource_types(&self) -> Vec<TypeId> {
        (0..self.names.len() as TypeId)
            .filter(|t| *t != self.any_resource && self.resource[*t as usize])
            .filter(|t| !matches!(self.name(*t), "DomainResource"))
            .collect()
    }

    /// A primitive datatype (a JSON scalar): lower-case names.
    pub fn is_primitive(&self, t: TypeId) -> bool {
        self.name(t).starts_with(|c: char| c.is_ascii_lowercase())
    }

    fn element_name(&self, e: u32) -> (TypeId, &str) {
        let (o, n) = &self.element_names[e as usize];
        (*o, n)
    }
}

/// What a value is besides its datatype: the two members streaming reads for
/// structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    #[default]
    Plain,
    /// A resource's `resourceType`: sets its object's type.
    ResourceType,
    /// An extension's `url`: decides whether its value is on the allow-list.
    ExtensionUrl,
    /// `Attachment.contentType`, `Binary.contentType` (profiles masking text
    /// attachments): says whether `data` is text.
    ContentType,
    /// `Attachment.data`, `Binary.data` (profiles masking text attachments).
    AttachmentData,
}

/// Where the stream is, as far as types go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TypeCtx {
    pub ty: TypeId,
    pub role: Role,
    /// An element of an allowed extension (its nested extensions may use relative
    /// urls).
    pub trusted: bool,
    /// Inside an extension value not on the allow-list: the rule in force is final.
    pub sealed: bool,
}

impl TypeCtx {
    pub fn root(model: &Model) -> TypeCtx {
        TypeCtx {
            ty: model.any_resource,
            role: Role::Plain,
            trusted: false,
            sealed: false,
        }
    }
}

/// A profile's type rules, resolved: the rule for every element of the model.
#[derive(Debug, Clone)]
pub struct FhirRules {
    model: &'static Model,
    /// Element id -> its rule (`Type.element` along the owner's bases, else the
    /// datatype's rule along its bases).
    element_rule: Vec<Option<u32>>,
    /// The rule for values no other rule covers.
    pub default_rule: u32,
    /// The rule for an extension's value whose url is not on the allow-list.
    pub extension_rule: u32,
    safe_extensions: FxHashSet<Box<str>>,
    /// Some rule masks text attachments: `data` and `contentType` of Attachment and
    /// Binary get their roles.
    text_attachments: bool,
    /// Element ids of `Attachment.data`, `Binary.data`.
    data_elements: [u32; 2],
    /// Element ids of `Attachment.contentType`, `Binary.contentType`.
    content_type_elements: [u32; 2],
}

/// A type rule as written: `Type` or `Type.element` (backbone paths included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Type(TypeId),
    Element(TypeId, u32),
}

impl Target {
    /// Resolves `HumanName`, `Address.state`, `Patient.contact.name`, `Resource.id`.
    pub fn parse(model: &Model, s: &str) -> Result<Target, String> {
        if let Some(t) = model.type_id(s) {
            return Ok(Target::Type(t));
        }
        let (owner, name) = s
            .rsplit_once('.')
            .ok_or_else(|| format!("`{s}` is no FHIR R4 datatype or resource"))?;
        let o = model.type_id(owner).ok_or_else(|| {
            format!("`{owner}` is no FHIR R4 datatype, resource or backbone element")
        })?;
        let (_, e) = model
            .element(o, name)
            .ok_or_else(|| format!("`{owner}` has no element `{name}` in FHIR R4"))?;
        Ok(Target::Element(o, e))
    }
}

impl FhirRules {
    /// `rules`: (target, rule index) in file order (the first for a target wins).
    pub fn new(
        model: &'static Model,
        rules: &[(Target, u32)],
        default_rule: u32,
        extension_rule: u32,
        safe_extensions: impl IntoIterator<Item = String>,
        text_attachments: bool,
    ) -> FhirRules {
        let mut by_type: FxHashMap<TypeId, u32> = FxHashMap::default();
        let mut by_element: FxHashMap<(TypeId, &str), u32> = FxHashMap::default();
        for (t, r) in rules {
            match *t {
                Target::Type(ty) => {
                    by_type.entry(ty).or_insert(*r);
                }
                Target::Element(o, e) => {
                    by_element.entry((o, model.element_name(e).1)).or_insert(*r);
                }
            }
        }
        let element_rule = (0..model.element_count() as u32)
            .map(|e| {
                let (owner, name) = model.element_name(e);
                let ty = model.elements[owner as usize][name].0;
                model
                    .bases(owner)
                    .find_map(|b| by_element.get(&(b, name)).copied())
                    .or_else(|| model.bases(ty).find_map(|b| by_type.get(&b).copied()))
            })
            .collect();
        let element = |t: &str, e: &str| {
            model
                .type_id(t)
                .and_then(|t| model.element(t, e))
                .map_or(NO_ELEMENT, |(_, id)| id)
        };
        FhirRules {
            model,
            element_rule,
            default_rule,
            extension_rule,
            safe_extensions: safe_extensions.into_iter().map(Into::into).collect(),
            text_attachments,
            data_elements: [element("Attachment", "data"), element("Binary", "data")],
            content_type_elements: [
                element("Attachment", "contentType"),
                element("Binary", "contentType"),
            ],
        }
    }

    pub fn model(&self) -> &'static Model {
        self.model
    }

    pub fn root(&self) -> TypeCtx {
        TypeCtx::root(self.model)
    }

    /// Whether an extension with this url is read by type: listed, or a nested
    /// extension's relative url (`ombCategory`) inside an allowed one (`trusted`).
    pub fn extension_allowed(&self, url: &str, trusted: bool) -> bool {
        self.safe_extensions.contains(url) || (trusted && !url.contains(':'))
    }

    /// Whether an object or array (`object`: which), itself an array element or not
    /// (`in_array`), contradicts the model at `ty`: FHIR JSON writes a primitive as
    /// a scalar (a repeating one as an array of scalars) and `resourceType` or an
    /// extension's `url` as a string. Such a value (malformed or hostile FHIR) must
    /// not pass under the primitive's rule (a `keep` on `code` would copy a name
    /// nested in it): it is read as [`Self::misplaced_ctx`], whole.
    #[inline]
    pub fn misplaced(&self, ty: TypeCtx, object: bool, in_array: bool) -> bool {
        if ty.sealed {
            return false;
        }
        ty.role != Role::Plain
            || (ty.ty != UNKNOWN && self.model.is_primitive(ty.ty) && (object || in_array))
    }

    /// The type context and rule of a misplaced value's subtree: sealed under the
    /// default rule (redact or drop), so no path or type rule inside it counts.
    pub fn misplaced_ctx(&self) -> (TypeCtx, u32) {
        let ty = TypeCtx {
            ty: UNKNOWN,
            role: Role::Plain,
            trusted: false,
            sealed: true,
        };
        (ty, self.default_rule)
    }

    /// Steps into member `key` of an object in `parent`; `url_safe`: the object is an
    /// extension whose url was read and is on the allow-list. Returns the child's
    /// context and the rule its type gives (`None`: inherit).
    #[inline]
    pub fn key(&self, parent: TypeCtx, key: &str, url_safe: bool) -> (TypeCtx, Option<u32>) {
        let m = self.model;
        let mut child = TypeCtx {
            ty: UNKNOWN,
            role: Role::Plain,
            trusted: false,
            sealed: parent.sealed,
        };
        if parent.ty == UNKNOWN || parent.sealed {
            return (child, None);
        }
        if m.is_primitive(parent.ty) {
            // FHIR XML: a primitive element's children are its extensions (JSON's
            // `_name`), under the default rule, not the primitive's. Anything else
            // there (an `id` attribute, an element FHIR has not) is not read by type.
            // (JSON never gets here: an object where a primitive belongs is sealed
            // whole, see `misplaced`.)
            if key == "extension" {
                child.ty = m.extension;
            } else {
                child.sealed = true;
            }
            return (child, Some(self.default_rule));
        }
        if key == "resourceType" && m.is_resource(parent.ty) {
            child.role = Role::ResourceType;
            return (child, None);
        }
        let found = match key.strip_prefix('_') {
            // A primitive's id and extensions (`_birthDate`).
            Some(k) => m.element(parent.ty, k).map(|_| (m.element, NO_ELEMENT)),
            None => m.element(parent.ty, key),
        };
        let Some((ty, e)) = found else {
            return (child, None);
        };
        child.ty = ty;
        if self.text_attachments && e != NO_ELEMENT {
            if self.data_elements.contains(&e) {
                child.role = Role::AttachmentData;
            } else if self.content_type_elements.contains(&e) {
                child.role = Role::ContentType;
            }
        }
        if parent.ty == m.extension {
            match key {
                "url" => child.role = Role::ExtensionUrl,
                // An extension's value and its nested extensions: read by type only
                // when its url (read before them) is allowed.
                k if k == "extension" || k.starts_with("value") => {
                    if !url_safe {
                        child.sealed = true;
                        return (child, Some(self.extension_rule));
                    }
                    child.trusted = true;
                }
                _ => {}
            }
        }
        let rule = if e == NO_ELEMENT {
            None
        } else {
            self.element_rule[e as usize]
        };
        (child, rule)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_knows_r4() {
        let m = r4();
        assert!(m.type_count() > 500, "{}", m.type_count());
        let patient = m.resource_type("Patient").unwrap();
        let (name, _) = m.element(patient, "name").unwrap();
        assert_eq!(m.name(name), "HumanName");
        let (contact, _) = m.element(patient, "contact").unwrap();
        assert_eq!(m.name(contact), "Patient.contact");
        assert_eq!(m.name(m.element(contact, "address").unwrap().0), "Address");
        let obs = m.resource_type("Observation").unwrap();
        assert_eq!(
            m.name(m.element(obs, "valueQuantity").unwrap().0),
            "Quantity"
        );
        assert_eq!(
            m.name(m.element(obs, "effectivePeriod").unwrap().0),
            "Period"
        );
        let cond = m.resource_type("Condition").unwrap();
        assert_eq!(m.name(m.element(cond, "onsetAge").unwrap().0), "Age");
        let age = m.type_id("Age").unwrap();
        assert_eq!(m.name(m.element(age, "value").unwrap().0), "decimal");
        // contentReference: nested items have the item's type.
        let q = m.type_id("Questionnaire.item").unwrap();
        assert_eq!(m.element(q, "item").unwrap().0, q);
        let ext = m.type_id("Extension").unwrap();
        assert_eq!(
            m.name(m.element(ext, "valueHumanName").unwrap().0),
            "HumanName"
        );
        assert_eq!(m.name(m.element(ext, "url").unwrap().0), "uri");
        assert!(m.resource_type("Resource").is_none());
        assert!(m.resource_type("HumanName").is_none());
        assert!(m.is_resource(m.type_id("Bundle").unwrap()));
        let entry = m.type_id("Bundle.entry").unwrap();
        assert_eq!(m.element(entry, "resource").unwrap().0, m.any_resource);
    }

    #[test]
    fn rules_follow_bases_and_types() {
        let m = r4();
        let t = |s: &str| Target::parse(m, s).unwrap();
        let rules = FhirRules::new(
            m,
            &[
                (t("Resource.id"), 0),
                (t("HumanName"), 1),
                (t("Address.state"), 2),
                (t("date"), 3),
            ],
            10,
            11,
            ["http://x/safe".to_owned()],
            false,
        );
        let root = rules.root();
        let patient = TypeCtx {
            ty: m.resource_type("Patient").unwrap(),
            ..root
        };
        assert_eq!(rules.key(patient, "id", false).1, Some(0));
        assert_eq!(rules.key(patient, "name", false).1, Some(1));
        assert_eq!(rules.key(patient, "birthDate", false).1, Some(3));
        let (addr, _) = rules.key(patient, "address", false);
        assert_eq!(rules.key(addr, "state", false).1, Some(2));
        assert_eq!(rules.key(addr, "city", false).1, None);
        let (b, r) = rules.key(patient, "_birthDate", false);
        assert_eq!((b.ty, r), (m.element, None));
        assert_eq!(
            rules.key(patient, "resourceType", false).0.role,
            Role::ResourceType
        );
        assert_eq!(rules.key(patient, "nonsense", false).0.ty, UNKNOWN);
        let (ext, _) = rules.key(patient, "extension", false);
        assert_eq!(ext.ty, m.extension);
        let (v, r) = rules.key(ext, "valueString", false);
        assert!(v.sealed);
        assert_eq!(r, Some(11));
        let (v, r) = rules.key(ext, "valueString", true);
        assert!(!v.sealed && v.trusted);
        assert_eq!(r, None);
        let (nested, r) = rules.key(ext, "extension", false);
        assert!(nested.sealed);
        assert_eq!(r, Some(11));
        assert!(rules.extension_allowed("http://x/safe", false));
        assert!(rules.extension_allowed("ombCategory", true));
        assert!(!rules.extension_allowed("ombCategory", false));
        assert!(!rules.extension_allowed("http://x/other", true));
        assert!(Target::parse(m, "Patient.nickname")
            .unwrap_err()
            .contains("no element"));
        assert!(Target::parse(m, "Humanname").is_err());
    }
}

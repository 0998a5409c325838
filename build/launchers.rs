//! The kernel-signature parser and launcher generator of build.rs (also compiled by
//! `tests/kernel_launchers.rs`, which runs it on `kernels/` and on signatures it must reject).
//!
//! Every `extern "C" __global__` signature becomes one argument struct and one launcher. The
//! struct has one field per C parameter, named as in the signature and in its order: a device
//! pointer is a field of a type that converts into `In<E>` (`const E*`) or `Out<E>` (`E*`) of
//! its element type, a scalar a field of the Rust type of the same width (`int` -> `i32`,
//! `float` -> `f32`, `long long` -> `i64`, `u32` -> `u32`, `u64` -> `u64`). A call names every
//! argument, so two arguments of the same type cannot trade places unnoticed, and a missing,
//! extra, misnamed or differently typed one does not compile. A parameter type the generator
//! cannot map is an error naming the file, kernel and declaration.

/// How one kernel parameter travels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A device pointer: `wrap` is `In` (const) or `Out`, `elem` the Rust element type.
    Pointer {
        wrap: &'static str,
        elem: &'static str,
    },
    /// A scalar of this Rust type.
    Scalar(&'static str),
}

/// One parameter of a kernel's `extern "C" __global__` signature.
#[derive(Clone, Debug)]
pub struct Param {
    /// The field name: the C name (a Rust keyword gets a trailing `_`).
    pub name: String,
    pub kind: Kind,
    /// The C declaration with its whitespace normalised.
    pub decl: String,
}

impl Param {
    /// The Rust type the argument becomes: `In<'a, Bf16>`, `Out<'a, f32>`, `i32`, ...
    pub fn rust(&self) -> String {
        match &self.kind {
            Kind::Pointer { wrap, elem } => format!("{wrap}<'a, {elem}>"),
            Kind::Scalar(t) => t.to_string(),
        }
    }

    /// The expression that puts field `a.<name>` into its 8-byte argument slot.
    fn slot(&self) -> String {
        let f = format!("a.{}", self.name);
        match &self.kind {
            Kind::Pointer { .. } => format!("{f}.into().addr()"),
            Kind::Scalar("i32") => format!("{f} as u32 as u64"),
            Kind::Scalar("u32") | Kind::Scalar("i64") => format!("{f} as u64"),
            Kind::Scalar("f32") => format!("{f}.to_bits() as u64"),
            Kind::Scalar(_) => f,
        }
    }
}

/// One `extern "C" __global__` kernel of a kernels/*.cu file.
#[derive(Clone, Debug)]
pub struct Kernel {
    /// The file stem (`rmsnorm` for kernels/rmsnorm.cu).
    pub module: String,
    pub name: String,
    pub params: Vec<Param>,
}

impl Kernel {
    /// The argument struct's name: the kernel name in CamelCase (`rmsnorm_fwd` -> `RmsnormFwd`).
    pub fn struct_name(&self) -> String {
        self.name
            .split('_')
            .filter(|w| !w.is_empty())
            .map(|w| {
                let mut c = w.chars();
                c.next()
                    .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                    .unwrap_or_default()
            })
            .collect()
    }
}

/// The most parameters a kernel may have (the launch builds its pointer array on the stack;
/// mirrored by `MAX_KERNEL_PARAMS` in src/backend/cuda/runtime.rs).
pub const MAX_PARAMS: usize = 24;

const RUST_KEYWORDS: &[&str] = &[
    "as", "async", "await", "box", "break", "const", "continue", "crate", "do", "dyn", "else",
    "enum", "extern", "false", "final", "fn", "for", "gen", "if", "impl", "in", "let", "loop",
    "macro", "match", "mod", "move", "mut", "override", "priv", "pub", "ref", "return", "self",
    "static", "struct", "super", "trait", "true", "try", "type", "typeof", "unsafe", "unsized",
    "use", "virtual", "where", "while", "yield",
];

/// Maps one C parameter (`const bf16_t* __restrict__ q`, `int n_tok`, ...) to its field: a
/// device pointer becomes `In<E>` (const) or `Out<E>` (mutable) of its element type, a scalar
/// its Rust type of the same width. `at` names the file for the error message.
pub fn param(at: &str, kernel: &str, decl: &str) -> Result<Param, String> {
    let decl = decl.split_whitespace().collect::<Vec<_>>().join(" ");
    let name_start = decl
        .rfind(|c: char| !(c.is_alphanumeric() || c == '_'))
        .map(|i| i + 1)
        .unwrap_or(0);
    let cname = &decl[name_start..];
    let ty = &decl[..name_start];
    if cname.is_empty() || ty.trim().is_empty() || cname.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(format!(
            "{at}: kernel {kernel}: parameter `{decl}` needs a type and a name (build.rs)"
        ));
    }
    let mut name = cname.to_string();
    if RUST_KEYWORDS.contains(&cname) {
        name.push('_');
    }
    let spaced = ty.replace('*', " * ");
    let words: Vec<&str> = spaced
        .split_whitespace()
        .filter(|w| *w != "__restrict__")
        .collect();
    let is_const = words.contains(&"const");
    let stars = words.iter().filter(|w| **w == "*").count();
    let base = words
        .iter()
        .filter(|w| **w != "const" && **w != "*")
        .copied()
        .collect::<Vec<_>>()
        .join(" ");
    let kind = match stars {
        0 => Kind::Scalar(match base.as_str() {
            "int" => "i32",
            "u32" | "unsigned" | "unsigned int" => "u32",
            "float" => "f32",
            "long long" | "long" | "int64_t" => "i64",
            "u64" | "unsigned long long" | "uint64_t" => "u64",
            other => {
                return Err(format!(
                    "{at}: kernel {kernel}: parameter `{decl}`: scalar type `{other}` has no launcher type (build.rs)"
                ))
            }
        }),
        1 => Kind::Pointer {
            wrap: if is_const { "In" } else { "Out" },
            elem: match base.as_str() {
                "bf16_t" => "Bf16",
                "float" => "f32",
                "u32" | "unsigned" | "unsigned int" => "u32",
                "double" => "f64",
                other => {
                    return Err(format!(
                        "{at}: kernel {kernel}: parameter `{decl}`: pointer to `{other}` has no device element type (build.rs)"
                    ))
                }
            },
        },
        _ => {
            return Err(format!(
                "{at}: kernel {kernel}: parameter `{decl}`: pointers to pointers are not supported (build.rs)"
            ))
        }
    };
    Ok(Param { name, kind, decl })
}

/// Every `extern "C" __global__` kernel of one source (`module` is its file stem, `at` its path
/// for error messages), with its parameters; an error for a signature it cannot type, a kernel
/// with too many parameters or a parameter name used twice.
pub fn parse_source(at: &str, module: &str, src: &str) -> Result<Vec<Kernel>, String> {
    let mut out = Vec::new();
    let mut rest = src;
    while let Some(i) = rest.find("extern \"C\"") {
        rest = &rest[i + "extern \"C\"".len()..];
        let head = rest.trim_start();
        let Some(after) = head.strip_prefix("__global__") else {
            continue;
        };
        let Some(open) = after.find('(') else { break };
        let mut before = after[..open].trim();
        let mut args_from = open;
        if before.ends_with("__launch_bounds__") {
            // skip the bounds' own parentheses
            let close = after[open..]
                .find(')')
                .map(|c| open + c + 1)
                .unwrap_or(open);
            let Some(o2) = after[close..].find('(') else {
                break;
            };
            before = after[..close + o2].trim();
            args_from = close + o2;
        }
        let name = before
            .split(|c: char| !(c.is_alphanumeric() || c == '_'))
            .rfind(|w| !w.is_empty())
            .ok_or_else(|| format!("{at}: kernel without a name (build.rs)"))?
            .to_string();
        let close = after[args_from..]
            .find(')')
            .ok_or_else(|| format!("{at}: kernel {name}: unclosed parameter list (build.rs)"))?;
        let params = after[args_from + 1..args_from + close]
            .split(',')
            .map(|p| p.trim())
            .filter(|p| !p.is_empty())
            .map(|p| param(at, &name, p))
            .collect::<Result<Vec<Param>, String>>()?;
        if params.len() > MAX_PARAMS {
            return Err(format!(
                "{at}: kernel {name} has {} parameters, at most {MAX_PARAMS} are supported (build.rs)",
                params.len()
            ));
        }
        for (i, p) in params.iter().enumerate() {
            if params[..i].iter().any(|q| q.name == p.name) {
                return Err(format!(
                    "{at}: kernel {name}: parameter name `{}` is used twice (build.rs)",
                    p.name
                ));
            }
        }
        out.push(Kernel {
            module: module.to_string(),
            name,
            params,
        });
    }
    Ok(out)
}

/// The kernels of every source, `(path, module, text)` in order; an error for any signature
/// [`parse_source`] rejects or a kernel name declared twice.
pub fn kernels(sources: &[(String, String, String)]) -> Result<Vec<Kernel>, String> {
    let mut out: Vec<Kernel> = Vec::new();
    for (at, module, src) in sources {
        for k in parse_source(at, module, src)? {
            if out.iter().any(|o| o.name == k.name) {
                return Err(format!(
                    "{at}: kernel {} is declared twice in kernels/ (build.rs)",
                    k.name
                ));
            }
            out.push(k);
        }
    }
    Ok(out)
}

/// The kernel table, and per kernel its argument struct and launcher. The launchers are
/// `deny(dead_code)`: a kernel that nothing launches fails the build.
pub fn launchers(kernels: &[Kernel]) -> String {
    let mut out = String::from(
        "/// (module, kernel) of every `extern \"C\" __global__` entry point; a launcher's index.\n\
         pub const KERNELS: &[(&str, &str)] = &[\n",
    );
    for k in kernels {
        out.push_str(&format!("    ({:?}, {:?}),\n", k.module, k.name));
    }
    out.push_str("];\n\n");
    out.push_str(
        "/// Per kernel file, one argument struct (a field per kernel parameter, by its C name, in\n\
         /// signature order) and one launcher per kernel.\n\
         #[deny(dead_code)]\n\
         pub(crate) mod launch {\n",
    );
    let mut modules: Vec<&str> = kernels.iter().map(|k| k.module.as_str()).collect();
    modules.dedup();
    for m in modules {
        out.push_str(&format!(
            "    /// Launchers of kernels/{m}.cu.\n    pub(crate) mod {m} {{\n        #[allow(unused_imports)]\n        use crate::backend::cuda::runtime::{{Bf16, Gpu, In, Launch, Out}};\n\n"
        ));
        for (id, k) in kernels.iter().enumerate().filter(|(_, k)| k.module == m) {
            out.push_str(&kernel_items(id, k));
        }
        out.push_str("    }\n\n");
    }
    out.push_str("}\n");
    out
}

/// The argument struct and launcher of kernel `id`.
fn kernel_items(id: usize, k: &Kernel) -> String {
    let s = k.struct_name();
    // One type parameter per pointer field, bounded by the launcher to convert into its
    // `In`/`Out` type.
    let generic: Vec<(String, &Param)> = k
        .params
        .iter()
        .filter(|p| matches!(p.kind, Kind::Pointer { .. }))
        .enumerate()
        .map(|(i, p)| (format!("P{i}"), p))
        .collect();
    let names: Vec<&str> = generic.iter().map(|(g, _)| g.as_str()).collect();
    let params = if names.is_empty() {
        String::new()
    } else {
        format!("<{}>", names.join(", "))
    };
    let decls: Vec<&str> = k.params.iter().map(|p| p.decl.as_str()).collect();
    let mut o = format!(
        "        /// The arguments of `{}({})`, in its order.\n        pub(crate) struct {s}{params} {{\n",
        k.name,
        decls.join(", ")
    );
    let mut gi = 0;
    for p in &k.params {
        let ty = match p.kind {
            Kind::Pointer { .. } => {
                gi += 1;
                format!("P{}", gi - 1)
            }
            Kind::Scalar(t) => t.to_string(),
        };
        o.push_str(&format!(
            "            /// `{}`: {}\n            pub {}: {ty},\n",
            p.decl,
            p.rust().replace("'a, ", ""),
            p.name
        ));
    }
    o.push_str("        }\n\n");
    let mut bounds = Vec::new();
    if !generic.is_empty() {
        bounds.push("'a".to_string());
    }
    bounds.extend(
        generic
            .iter()
            .map(|(g, p)| format!("{g}: Into<{}>", p.rust())),
    );
    let bounds = if bounds.is_empty() {
        String::new()
    } else {
        format!("<{}>", bounds.join(", "))
    };
    let slots: Vec<String> = k.params.iter().map(|p| p.slot()).collect();
    o.push_str(&format!(
        "        /// Launches `{}` with the arguments of [`{s}`].\n        pub(crate) fn {}{}(gpu: &Gpu, cfg: Launch, a: {s}{params}) -> crate::Result<()> {{\n            gpu.launch_kernel({id}, cfg, &mut [{}])\n        }}\n\n",
        k.name,
        k.name,
        bounds,
        slots.join(", ")
    ));
    o
}

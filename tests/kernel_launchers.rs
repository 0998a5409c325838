//! The launcher generator of build.rs (`build/launchers.rs`), run here on the real kernels/
//! sources and on signatures it must reject: every kernel parameter has a unique, descriptive
//! name; every generated argument struct has one field per parameter, in signature order, of
//! the type the C declaration maps to (checked against a table written here, not the
//! generator's); the generated code is the code this build compiled; and a parameter the
//! generator cannot type is an error naming the file, kernel and declaration.

#[allow(dead_code)]
#[path = "../build/launchers.rs"]
mod launchers;

use std::path::Path;

/// (path, module, text) of every kernels/*.cu, sorted as build.rs sorts them.
fn sources() -> Vec<(String, String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let module = p.file_stem().unwrap().to_string_lossy().into_owned();
            (p.display().to_string(), module, text)
        })
        .collect()
}

/// The launcher type a C parameter declaration must map to (this test's own table).
fn expected_type(decl: &str) -> String {
    let d = decl.replace("__restrict__", "");
    let words: Vec<&str> = d.split_whitespace().collect();
    let ty = words[..words.len() - 1].join(" ");
    let table: &[(&str, &str)] = &[
        ("const bf16_t*", "In<'a, Bf16>"),
        ("bf16_t*", "Out<'a, Bf16>"),
        ("const float*", "In<'a, f32>"),
        ("float*", "Out<'a, f32>"),
        ("const u32*", "In<'a, u32>"),
        ("u32*", "Out<'a, u32>"),
        ("const double*", "In<'a, f64>"),
        ("double*", "Out<'a, f64>"),
        ("int", "i32"),
        ("float", "f32"),
        ("long long", "i64"),
        ("u32", "u32"),
        ("u64", "u64"),
    ];
    let key = ty.replace(" *", "*");
    table
        .iter()
        .find(|(c, _)| *c == key)
        .map(|(_, r)| r.to_string())
        .unwrap_or_else(|| panic!("`{decl}`: C type `{key}` is not in this test's table"))
}

/// The raw parameter declarations of `kernel` in `src`, split by this test (not the generator):
/// the last parenthesised list before the body of an `extern "C" __global__` declaration.
fn raw_params(src: &str, kernel: &str) -> Vec<String> {
    for (i, _) in src.match_indices("extern \"C\"") {
        let head = &src[i..i + src[i..].find('{').unwrap()];
        if !head.contains("__global__") {
            continue;
        }
        let open = head.rfind('(').unwrap();
        let name = head[..open]
            .trim_end()
            .rsplit(|c: char| !(c.is_alphanumeric() || c == '_'));
        if name.into_iter().next() != Some(kernel) {
            continue;
        }
        let close = head.rfind(')').unwrap();
        return head[open + 1..close]
            .split(',')
            .map(|p| p.split_whitespace().collect::<Vec<_>>().join(" "))
            .filter(|p| !p.is_empty())
            .collect();
    }
    panic!("kernel {kernel} not found in its source")
}

/// Names that say nothing about the argument: placeholders (`arg`, `ptr`, `tmp`, ...), numbered
/// placeholders (`arg0`, `p1`, `param2`), or a leading underscore.
fn generic_name(name: &str) -> bool {
    let numbered = |prefix: &str| {
        name.strip_prefix(prefix)
            .is_some_and(|r| !r.is_empty() && r.chars().all(|c| c.is_ascii_digit()))
    };
    name.starts_with('_')
        || ["arg", "args", "p", "ptr", "buf", "tmp", "unused", "dummy"].contains(&name)
        || ["arg", "param", "p", "ptr", "buf"]
            .iter()
            .any(|p| numbered(p))
}

#[test]
fn every_kernel_parameter_has_a_unique_descriptive_name() {
    let ks = launchers::kernels(&sources()).unwrap();
    assert!(ks.len() > 30, "only {} kernels found", ks.len());
    for k in &ks {
        for (i, p) in k.params.iter().enumerate() {
            assert!(
                !generic_name(&p.name),
                "kernel {}: parameter `{}` has a placeholder name",
                k.name,
                p.name
            );
            assert!(
                k.params[..i].iter().all(|q| q.name != p.name),
                "kernel {}: parameter `{}` twice",
                k.name,
                p.name
            );
        }
    }
}

/// (field name, field type with a pointer's type parameter resolved to its bound) of every
/// argument struct in generated code, by struct name.
fn generated_fields(code: &str) -> Vec<(String, Vec<(String, String)>)> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("pub(crate) struct ") {
        rest = &rest[i + "pub(crate) struct ".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let body = &rest[rest.find('{').unwrap() + 1..rest.find("\n        }").unwrap()];
        let launcher = &rest[rest.find("pub(crate) fn ").unwrap()..];
        let sig = &launcher[..launcher.find("(gpu").unwrap()];
        let fields = body
            .lines()
            .map(str::trim)
            .filter_map(|l| l.strip_prefix("pub "))
            .map(|l| {
                let (f, ty) = l.trim_end_matches(',').split_once(": ").unwrap();
                let ty = match sig.find(&format!("{ty}: Into<")) {
                    Some(b) => {
                        let from = b + ty.len() + ": Into<".len();
                        let mut depth = 1;
                        let end = sig[from..]
                            .char_indices()
                            .find(|&(_, c)| {
                                depth += match c {
                                    '<' => 1,
                                    '>' => -1,
                                    _ => 0,
                                };
                                depth == 0
                            })
                            .unwrap()
                            .0;
                        sig[from..from + end].to_string()
                    }
                    None => ty.to_string(),
                };
                (f.to_string(), ty)
            })
            .collect();
        out.push((name, fields));
    }
    out
}

#[test]
fn every_argument_struct_matches_its_kernel_signature() {
    let srcs = sources();
    let ks = launchers::kernels(&srcs).unwrap();
    let code = launchers::launchers(&ks);
    let structs = generated_fields(&code);
    assert_eq!(structs.len(), ks.len(), "one argument struct per kernel");
    for k in &ks {
        let (_, _, src) = srcs.iter().find(|(_, m, _)| *m == k.module).unwrap();
        let want: Vec<(String, String)> = raw_params(src, &k.name)
            .iter()
            .map(|d| {
                let name = d.rsplit([' ', '*']).next().unwrap().to_string();
                (name, expected_type(d))
            })
            .collect();
        let (_, got) = structs
            .iter()
            .find(|(s, _)| *s == k.struct_name())
            .unwrap_or_else(|| panic!("no struct {} for kernel {}", k.struct_name(), k.name));
        assert_eq!(
            got, &want,
            "kernel {}: fields against the signature",
            k.name
        );
        assert!(
            code.contains(&format!("pub(crate) fn {}", k.name)),
            "launcher {}",
            k.name
        );
    }
}

#[test]
fn the_generated_launchers_are_the_ones_this_build_compiled() {
    let built = std::fs::read_to_string(Path::new(env!("OUT_DIR")).join("kernels_gen.rs")).unwrap();
    let ks = launchers::kernels(&sources()).unwrap();
    let code = launchers::launchers(&ks);
    assert!(
        built.contains(&code),
        "kernels_gen.rs does not hold what build/launchers.rs generates from kernels/"
    );
}

#[test]
fn a_signature_the_generator_cannot_type_is_an_error_naming_it() {
    let bad: &[(&str, &str)] = &[
        (
            "extern \"C\" __global__ void k1(const half* __restrict__ x, int n) {}",
            "kernel k1: parameter `const half* __restrict__ x`: pointer to `half` has no device element type",
        ),
        (
            "extern \"C\" __global__ void k2(float* y, size_t n) {}",
            "kernel k2: parameter `size_t n`: scalar type `size_t` has no launcher type",
        ),
        (
            "extern \"C\" __global__ void k3(float** y) {}",
            "kernel k3: parameter `float** y`: pointers to pointers are not supported",
        ),
        (
            "extern \"C\" __global__ void k4(float* y, int) {}",
            "kernel k4: parameter `int` needs a type and a name",
        ),
        (
            "extern \"C\" __global__ void k5(float* y, int n, int n) {}",
            "kernel k5: parameter name `n` is used twice",
        ),
        (
            "extern \"C\" __global__ void k6(const double* x, double y) {}",
            "kernel k6: parameter `double y`: scalar type `double` has no launcher type",
        ),
    ];
    for (src, want) in bad {
        let err = launchers::parse_source("kernels/new.cu", "new", src).unwrap_err();
        assert!(
            err.starts_with("kernels/new.cu: ") && err.contains(want),
            "{src}: got `{err}`, want `{want}`"
        );
    }
    let many: Vec<String> = (0..=launchers::MAX_PARAMS)
        .map(|i| format!("int n{i}"))
        .collect();
    let src = format!("extern \"C\" __global__ void k7({}) {{}}", many.join(", "));
    let err = launchers::parse_source("kernels/new.cu", "new", &src).unwrap_err();
    assert!(
        err.contains("kernel k7 has 25 parameters, at most 24"),
        "{err}"
    );
    let twice = vec![
        (
            "a.cu".to_string(),
            "a".to_string(),
            "extern \"C\" __global__ void k8(int n) {}".to_string(),
        ),
        (
            "b.cu".to_string(),
            "b".to_string(),
            "extern \"C\" __global__ void k8(int m) {}".to_string(),
        ),
    ];
    let err = launchers::kernels(&twice).unwrap_err();
    assert!(err.contains("b.cu: kernel k8 is declared twice"), "{err}");
    // a kernel the generator can type
    let ok = launchers::parse_source(
        "kernels/new.cu",
        "new",
        "extern \"C\" __global__ void __launch_bounds__(128) k9(const bf16_t* __restrict__ x, u32* out, long long n) {}",
    )
    .unwrap();
    assert_eq!(ok.len(), 1);
    let got: Vec<(String, String)> = ok[0]
        .params
        .iter()
        .map(|p| (p.name.clone(), p.rust()))
        .collect();
    let want = [("x", "In<'a, Bf16>"), ("out", "Out<'a, u32>"), ("n", "i64")];
    assert_eq!(
        got,
        want.map(|(a, b)| (a.to_string(), b.to_string())).to_vec()
    );
}

use std::{fs, io::Write, os::unix::fs::PermissionsExt, path::Path};

use super::*;

/// A tar layer built entry by entry; names are written into the header as
/// they are, so that a test can build what a hostile registry would send.
struct Layer(tar::Builder<Vec<u8>>);

impl Layer {
    fn new() -> Self {
        Self(tar::Builder::new(Vec::new()))
    }
    fn header(name: &str, kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        let raw = &mut header.as_old_mut().name;
        raw[..name.len()].copy_from_slice(name.as_bytes());
        header.set_entry_type(kind);
        header.set_size(size);
        header.set_mode(mode);
        header.set_mtime(1_700_000_000);
        header.set_uid(0);
        header.set_gid(0);
        header.set_cksum();
        header
    }
    fn file(mut self, name: &str, content: &str) -> Self {
        let header = Self::header(name, tar::EntryType::Regular, content.len() as u64, 0o644);
        self.0.append(&header, content.as_bytes()).unwrap();
        self
    }
    fn file_mode(mut self, name: &str, content: &str, mode: u32) -> Self {
        let header = Self::header(name, tar::EntryType::Regular, content.len() as u64, mode);
        self.0.append(&header, content.as_bytes()).unwrap();
        self
    }
    fn dir(mut self, name: &str) -> Self {
        let header = Self::header(name, tar::EntryType::Directory, 0, 0o755);
        self.0.append(&header, &[][..]).unwrap();
        self
    }
    fn link(mut self, name: &str, kind: tar::EntryType, target: &str) -> Self {
        let mut header = Self::header(name, kind, 0, 0o777);
        header.as_old_mut().linkname[..target.len()].copy_from_slice(target.as_bytes());
        header.set_cksum();
        self.0.append(&header, &[][..]).unwrap();
        self
    }
    fn apply(self, root: &Path) -> Result<u64, String> {
        let bytes = self.0.into_inner().unwrap();
        apply_layer(&bytes[..], root, u64::MAX)
    }
}

fn read(path: impl AsRef<Path>) -> Option<String> {
    fs::read_to_string(path).ok()
}

#[test]
fn layers_apply_in_order_with_whiteouts_and_opaque_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    fs::create_dir(&root).unwrap();
    Layer::new()
        .dir("etc/")
        .file("etc/os-release", "base")
        .file("etc/hidden", "lower")
        .dir("data/")
        .file("data/a", "lower a")
        .file("data/b", "lower b")
        .apply(&root)
        .unwrap();
    Layer::new()
        .file("etc/.wh.hidden", "")
        .file("etc/os-release", "top")
        .dir("data/")
        .file("data/c", "upper c")
        .file("data/.wh..wh..opq", "")
        .apply(&root)
        .unwrap();
    assert_eq!(read(root.join("etc/os-release")).as_deref(), Some("top"));
    assert!(!root.join("etc/hidden").exists(), "a whiteout hides the lower file");
    assert!(
        !root.join("etc/.wh.hidden").exists(),
        "whiteouts are not files of the image"
    );
    assert!(
        !root.join("data/a").exists() && !root.join("data/b").exists(),
        "an opaque directory hides the lower layers' entries"
    );
    assert_eq!(
        read(root.join("data/c")).as_deref(),
        Some("upper c"),
        "but keeps its own layer's"
    );
}

#[test]
fn an_entry_with_dot_dot_is_refused_and_nothing_outside_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("a/b/root");
    fs::create_dir_all(&root).unwrap();
    let err = Layer::new().file("../../../escaped", "x").apply(&root).unwrap_err();
    assert!(err.contains("leads out of the image's root"), "{err}");
    assert!(!tmp.path().join("escaped").exists() && !tmp.path().join("a/escaped").exists());
    let err = Layer::new().file("etc/../../escaped", "x").apply(&root).unwrap_err();
    assert!(err.contains("leads out"), "{err}");
    assert!(!tmp.path().join("a/b/escaped").exists());
}

#[test]
fn symbolic_links_are_followed_inside_the_root_only() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let outside = tmp.path().join("outside");
    fs::create_dir_all(&root).unwrap();
    fs::create_dir_all(&outside).unwrap();
    let outside_text = outside.to_str().unwrap().to_string();
    Layer::new()
        .link("abs", tar::EntryType::Symlink, &outside_text)
        .link("up", tar::EntryType::Symlink, "../../../..")
        .link("lib", tar::EntryType::Symlink, "usr/lib")
        .dir("usr/")
        .dir("usr/lib/")
        .apply(&root)
        .unwrap();
    Layer::new()
        .file("abs/through-absolute", "a")
        .file("up/through-relative", "r")
        .file("lib/libx.so", "l")
        .apply(&root)
        .unwrap();
    assert!(
        !outside.join("through-absolute").exists(),
        "nothing written through an absolute link"
    );
    assert!(
        !tmp.path().join("through-relative").exists(),
        "nothing written above the root"
    );
    let inside = resolve_in_root(&root, Path::new("abs"), true).unwrap();
    assert!(inside.starts_with(&root), "{}", inside.display());
    assert_eq!(read(inside.join("through-absolute")).as_deref(), Some("a"));
    assert_eq!(read(root.join("through-relative")).as_deref(), Some("r"));
    // A relative link inside the image works as it would in a container.
    assert_eq!(read(root.join("usr/lib/libx.so")).as_deref(), Some("l"));
    // The links themselves stay as the image has them.
    assert_eq!(fs::read_link(root.join("abs")).unwrap(), outside);
}

#[test]
fn hard_links_must_name_a_file_of_the_image() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    fs::create_dir_all(&root).unwrap();
    fs::write(tmp.path().join("secret"), "host").unwrap();
    let err = Layer::new()
        .link("x", tar::EntryType::Link, "../secret")
        .apply(&root)
        .unwrap_err();
    assert!(err.contains("leads out"), "{err}");
    // Through a link pointing out: resolved inside the root, where there is
    // no such file.
    let outside = tmp.path().to_str().unwrap().to_string();
    let err = Layer::new()
        .link("out", tar::EntryType::Symlink, &outside)
        .link("y", tar::EntryType::Link, "out/secret")
        .apply(&root)
        .unwrap_err();
    assert!(err.contains("not a file of the image"), "{err}");
    assert!(!root.join("y").exists());
    Layer::new()
        .file("a", "same")
        .link("b", tar::EntryType::Link, "a")
        .apply(&root)
        .unwrap();
    assert_eq!(
        fs::metadata(root.join("b")).unwrap().ino(),
        fs::metadata(root.join("a")).unwrap().ino()
    );
}

#[test]
fn devices_are_skipped_and_setuid_bits_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    fs::create_dir_all(&root).unwrap();
    let mut layer = Layer::new().file_mode("bin/su", "#!", 0o4755);
    let mut header = Layer::header("dev/sda", tar::EntryType::Block, 0, 0o660);
    header.set_device_major(8).unwrap();
    header.set_cksum();
    layer.0.append(&header, &[][..]).unwrap();
    layer.apply(&root).unwrap();
    assert!(!root.join("dev/sda").exists());
    assert_eq!(
        fs::metadata(root.join("bin/su")).unwrap().permissions().mode() & 0o7777,
        0o755
    );
}

#[test]
fn gzip_and_zstd_layers_and_the_byte_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    fs::create_dir_all(&root).unwrap();
    let tar = Layer::new().file("big", &"x".repeat(4096)).0.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    let blob = tmp.path().join("blob");
    fs::write(&blob, gz.finish().unwrap()).unwrap();
    let n = apply_layer_file(&blob, "application/vnd.oci.image.layer.v1.tar+gzip", &root, 1 << 20).unwrap();
    assert_eq!(n, 4096);
    let err = apply_layer(&tar[..], &tmp.path().join("root2"), 1000).unwrap_err();
    assert!(err.contains("image cache limit"), "{err}");
    // zstd, as newer builders write layers.
    let zstd = ruzstd::encoding::compress_to_vec(
        &Layer::new().file("zstd-file", "z").0.into_inner().unwrap()[..],
        ruzstd::encoding::CompressionLevel::Fastest,
    );
    fs::write(&blob, zstd).unwrap();
    apply_layer_file(&blob, "application/vnd.oci.image.layer.v1.tar+zstd", &root, 1 << 20).unwrap();
    assert_eq!(read(root.join("zstd-file")).as_deref(), Some("z"));
    fs::write(&blob, b"x").unwrap();
    let err = apply_layer_file(&blob, "application/vnd.example.layer", &root, 1 << 20).unwrap_err();
    assert!(err.contains("not supported"), "{err}");
}

#[test]
fn the_python_of_an_image_and_its_version() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    fs::create_dir_all(root.join("usr/local/bin")).unwrap();
    fs::create_dir_all(root.join("usr/bin")).unwrap();
    let exe = root.join("usr/local/bin/python3.12");
    fs::write(&exe, "").unwrap();
    fs::set_permissions(&exe, fs::Permissions::from_mode(0o755)).unwrap();
    // An absolute link, as images have it: resolved inside the image.
    std::os::unix::fs::symlink("/usr/local/bin/python3.12", root.join("usr/bin/python3")).unwrap();
    assert_eq!(
        find_python(root, "/usr/bin:/usr/local/bin"),
        Some(("/usr/bin/python3".to_string(), "3.12".to_string()))
    );
    assert_eq!(find_python(root, "/nowhere"), None);
}

#[test]
fn registry_credentials_come_from_a_docker_config_file() {
    let file = r#"{"auths": {
        "registry.lab:5000": {"auth": "YWxpY2U6czNjcmV0"},
        "https://index.docker.io/v1/": {"username": "bob", "password": "pw"},
        "tokens.lab": {"identitytoken": "tok"}
    }}"#;
    assert!(
        matches!(credentials(file, "registry.lab:5000").unwrap(), RegistryAuth::Basic(u, p) if u == "alice" && p == "s3cret")
    );
    assert!(matches!(credentials(file, "docker.io").unwrap(), RegistryAuth::Basic(u, _) if u == "bob"));
    assert!(matches!(credentials(file, "tokens.lab").unwrap(), RegistryAuth::Bearer(t) if t == "tok"));
    assert!(matches!(
        credentials(file, "other.lab").unwrap(),
        RegistryAuth::Anonymous
    ));
    assert!(credentials("{", "x").is_err());
}

#[test]
fn driver_libraries_from_ldconfig() {
    let listing = "\
1234 libs found in cache `/etc/ld.so.cache'
\tlibnvidia-ml.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1
\tlibcuda.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcuda.so.1
\tlibcuda.so.1 (libc6) => /usr/lib/i386-linux-gnu/libcuda.so.1
\tlibcuda.so (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcuda.so
\tlibc.so.6 (libc6,x86-64) => /lib/x86_64-linux-gnu/libc.so.6
";
    let found = parse_ldconfig(listing);
    let names: Vec<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["libnvidia-ml.so.1", "libcuda.so.1", "libcuda.so"]);
    assert_eq!(found[1].1, Path::new("/usr/lib/x86_64-linux-gnu/libcuda.so.1"));
}

#[test]
fn images_no_one_holds_are_evicted_least_recently_used_first() {
    let tmp = tempfile::tempdir().unwrap();
    let config = ImageConfig {
        insecure_registries: vec![],
        auth_file: None,
        max_bytes: 150,
    };
    let images = Images::new(config, tmp.path(), "n1".into());
    let now = std::time::SystemTime::now();
    for (n, name) in ["a", "b", "c"].iter().enumerate() {
        let dir = tmp.path().join("images").join(name);
        fs::create_dir_all(dir.join("rootfs")).unwrap();
        let image = Image {
            reference: format!("r/{name}"),
            digest: format!("sha256:{name}"),
            python: "/usr/bin/python3".into(),
            python_version: "3.11".into(),
            env: vec![],
            workdir: "/".into(),
            bytes: 100,
            dir: dir.clone(),
        };
        fs::write(dir.join("image.json"), serde_json::to_vec(&image).unwrap()).unwrap();
        let used = fs::File::create(dir.join(".fleetmap-last-used")).unwrap();
        used.set_modified(now - std::time::Duration::from_secs(100 - n as u64))
            .unwrap();
    }
    // b, the second oldest, is held by a slot or a warm worker.
    let held = images.lease("sha256:b");
    images.evict("sha256:c");
    let left = |name: &str| tmp.path().join("images").join(name).exists();
    assert!(!left("a"), "the least recently used image no one holds is evicted");
    assert!(left("b"), "a held image is kept, even above the limit");
    assert!(left("c"), "the image just pulled is kept");
    drop(held);
    images.evict("sha256:c");
    assert!(!left("b"), "once released it goes too");
    assert!(left("c"));
}

#[test]
fn only_digests_name_cache_directories() {
    assert!(is_digest(&format!("sha256:{}", "ab12".repeat(16))));
    assert!(is_digest(&format!("sha512:{}", "0f".repeat(64))));
    for bad in [
        "sha256:../../etc",
        "sha256:",
        "sha256/abc:00000000000000000000000000000000",
        &format!("sha256:{}", "AB".repeat(32)),
        &format!("sha256:{}/x", "ab".repeat(32)),
        "latest",
    ] {
        assert!(!is_digest(bad), "{bad}");
    }
}

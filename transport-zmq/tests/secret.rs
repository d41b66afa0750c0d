//! Reading the cluster secret from a file or the environment (one test: it sets a variable).

use transport_zmq::{secret_from_env_or_file, ZmqError, SECRET_ENV};

#[test]
fn secret_comes_from_the_file_or_else_the_environment() {
    let dir = std::env::temp_dir().join(format!("coherence-secret-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("secret");

    std::fs::write(&file, b"s3cret\r\n").unwrap();
    assert_eq!(
        secret_from_env_or_file(Some(&file)).unwrap(),
        Some(b"s3cret".to_vec()),
        "one trailing line break is not part of the secret"
    );
    std::fs::write(&file, b"\x00binary\n\n").unwrap();
    assert_eq!(
        secret_from_env_or_file(Some(&file)).unwrap(),
        Some(b"\x00binary\n".to_vec())
    );
    std::fs::write(&file, b"\n").unwrap();
    assert!(matches!(
        secret_from_env_or_file(Some(&file)),
        Err(ZmqError::EmptySecret)
    ));
    assert!(matches!(
        secret_from_env_or_file(Some(&dir.join("missing"))),
        Err(ZmqError::SecretFile { .. })
    ));

    std::env::remove_var(SECRET_ENV);
    assert_eq!(secret_from_env_or_file(None).unwrap(), None);
    std::env::set_var(SECRET_ENV, "from-env");
    assert_eq!(
        secret_from_env_or_file(None).unwrap(),
        Some(b"from-env".to_vec())
    );
    // A file, when given, wins over the environment.
    std::fs::write(&file, b"from-file").unwrap();
    assert_eq!(
        secret_from_env_or_file(Some(&file)).unwrap(),
        Some(b"from-file".to_vec())
    );
    std::env::set_var(SECRET_ENV, "");
    assert!(matches!(
        secret_from_env_or_file(None),
        Err(ZmqError::EmptySecret)
    ));
    std::env::remove_var(SECRET_ENV);
    std::fs::remove_dir_all(&dir).unwrap();
}

//! Reading the cluster secret from a file or the environment (one test sets a variable that no
//! other test here reads), and refusing to listen beyond loopback without a secret.

use transport_zmq::{secret_from_env_or_file, ZmqConfig, ZmqError, ZmqTransport, SECRET_ENV};

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

#[test]
fn refuses_to_listen_beyond_loopback_without_a_secret() {
    for listen in ["tcp://0.0.0.0:0", "tcp://[::]:0", "tcp://example.com:7000"] {
        let error = ZmqTransport::start(ZmqConfig::new(listen, "open")).unwrap_err();
        let message = error.to_string();
        assert!(
            matches!(error, ZmqError::Insecure { .. }),
            "{listen}: {error:?}"
        );
        for needed in [listen, "secret", "insecure"] {
            assert!(message.contains(needed), "{message:?} lacks {needed:?}");
        }
    }
    // A secret, or the explicit opt-out, lets it start; loopback needs neither.
    for config in [
        ZmqConfig {
            secret: Some(b"s".to_vec()),
            ..ZmqConfig::new("tcp://0.0.0.0:0", "open")
        },
        ZmqConfig {
            insecure: true,
            ..ZmqConfig::new("tcp://0.0.0.0:0", "open")
        },
        ZmqConfig::new("tcp://127.0.0.1:0", "open"),
        ZmqConfig::new("tcp://localhost:0", "open"),
    ] {
        let node =
            ZmqTransport::start(config.clone()).unwrap_or_else(|e| panic!("{config:?}: {e}"));
        drop(node);
    }
}

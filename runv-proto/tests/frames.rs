use proptest::prelude::*;
use runv_proto::*;

fn frame_type() -> impl Strategy<Value = FrameType> {
    prop_oneof![
        Just(FrameType::Control),
        Just(FrameType::Data),
        Just(FrameType::Eof),
        Just(FrameType::Credit),
    ]
}

fn any_frame() -> impl Strategy<Value = Frame> {
    (
        frame_type(),
        any::<u32>(),
        proptest::collection::vec(any::<u8>(), 0..4096),
    )
        .prop_map(|(kind, stream, payload)| match kind {
            FrameType::Eof => Frame::eof(stream),
            FrameType::Credit => Frame::credit(stream, payload.len() as u32 * 7),
            _ => Frame {
                kind,
                stream,
                payload,
            },
        })
}

fn stdio() -> impl Strategy<Value = Stdio> {
    (
        any::<bool>(),
        any::<Option<u32>>(),
        any::<u32>(),
        any::<Option<u32>>(),
    )
        .prop_map(|(terminal, stdin, stdout, stderr)| Stdio {
            terminal,
            stdin,
            stdout,
            stderr,
        })
}

fn request() -> impl Strategy<Value = Request> {
    let s = "[a-zA-Z0-9_./ -]{0,24}";
    prop_oneof![
        Just(Request::Ping),
        Just(Request::Shutdown),
        (s, s, stdio(), any::<bool>(), any::<Option<String>>()).prop_map(
            |(id, tag, stdio, readonly, hostname)| Request::CreateContainer {
                spec: serde_json::json!({"ociVersion": "1.0.2", "process": {"args": [id.clone()]}}),
                id,
                rootfs: Rootfs {
                    source: RootfsSource::Share { tag },
                    readonly,
                },
                stdio,
                hostname,
                hosts: Some("127.0.0.1 localhost\n".into()),
                resolv_conf: None,
                pod_sandbox: None,
            }
        ),
        (s, s).prop_map(|(id, serial)| Request::CreateContainer {
            id,
            spec: serde_json::json!({}),
            rootfs: Rootfs {
                source: RootfsSource::Block {
                    serial,
                    fs_type: "ext4".into()
                },
                readonly: false
            },
            stdio: Stdio {
                terminal: true,
                stdin: Some(1),
                stdout: 2,
                stderr: None
            },
            hostname: None,
            hosts: None,
            resolv_conf: None,
            pod_sandbox: None,
        }),
        s.prop_map(|id| Request::StartContainer { id }),
        (s, s, stdio()).prop_map(|(c, e, stdio)| Request::Exec {
            container_id: c,
            exec_id: e,
            process: serde_json::json!({"args": ["sh"], "env": ["A=b"]}),
            stdio
        }),
        (s, any::<Option<String>>(), any::<i32>(), any::<bool>()).prop_map(
            |(c, e, signal, all)| Request::Signal {
                container_id: c,
                exec_id: e,
                signal,
                all
            }
        ),
        (s, any::<u16>(), any::<u16>()).prop_map(|(c, rows, cols)| Request::WindowSize {
            container_id: c,
            exec_id: None,
            rows,
            cols
        }),
        s.prop_map(|c| Request::Ps { container_id: c }),
        s.prop_map(|id| Request::RemoveContainer { id }),
        (s, any::<Option<u32>>()).prop_map(|(name, mtu)| Request::ConfigureNetwork {
            interfaces: vec![Interface {
                mac: "52:54:00:12:34:56".into(),
                name,
                mtu,
                addresses: vec!["10.0.2.15/24".into()]
            }],
            routes: vec![Route {
                dest: "default".into(),
                gateway: Some("10.0.2.2".into()),
                device: None
            }]
        }),
    ]
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (any::<u32>(), ".{0,20}", proptest::option::of(any::<u64>())).prop_map(
            |(version, agent_version, window)| Message::Hello {
                version,
                agent_version,
                window
            }
        ),
        (any::<u64>(), request()).prop_map(|(id, body)| Message::Request { id, body }),
        (any::<u64>(), ".{0,40}", any::<i32>()).prop_map(|(id, m, code)| Message::Response {
            id,
            result: Err(AgentError::new(code, m))
        }),
        any::<u64>().prop_map(|id| Message::Response {
            id,
            result: Ok(ResponseBody::Ps {
                processes: vec![ProcessInfo {
                    pid: 1,
                    ppid: 0,
                    uid: 0,
                    state: "S".into(),
                    args: vec!["sh".into()]
                }]
            })
        }),
        (any::<u64>(), any::<i32>()).prop_map(|(id, pid)| Message::Response {
            id,
            result: Ok(ResponseBody::Process { pid })
        }),
        (
            ".{0,10}",
            any::<Option<String>>(),
            any::<i32>(),
            any::<bool>()
        )
            .prop_map(|(c, e, n, sig)| Message::Event {
                event: Event::ProcessExited {
                    container_id: c,
                    exec_id: e,
                    status: if sig {
                        ExitStatus::Signaled(n)
                    } else {
                        ExitStatus::Exited(n)
                    },
                }
            }),
    ]
}

proptest! {
    #[test]
    fn frames_round_trip(frames in proptest::collection::vec(any_frame(), 1..8)) {
        let mut wire = Vec::new();
        for f in &frames {
            f.encode_into(&mut wire).unwrap();
        }
        // Through the slice decoder.
        let mut rest = &wire[..];
        for f in &frames {
            let (g, n) = decode_frame(rest).unwrap().expect("complete frame");
            prop_assert_eq!(&g, f);
            rest = &rest[n..];
        }
        prop_assert!(rest.is_empty());
        // Through the stream reader.
        let mut r = FrameReader::new(&wire[..]);
        for f in &frames {
            prop_assert_eq!(&r.read_frame().unwrap().unwrap(), f);
        }
        prop_assert!(r.read_frame().unwrap().is_none());
    }

    #[test]
    fn every_prefix_is_incomplete_not_an_error(f in any_frame()) {
        let wire = f.encode().unwrap();
        for cut in 0..wire.len() {
            prop_assert!(decode_frame(&wire[..cut]).unwrap().is_none());
        }
    }

    #[test]
    fn messages_round_trip(m in message()) {
        let f = Frame::control(&m).unwrap();
        let (g, _) = decode_frame(&f.encode().unwrap()).unwrap().unwrap();
        prop_assert_eq!(g.message().unwrap(), m);
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = decode_frame(&bytes);
        let mut r = FrameReader::new(&bytes[..]);
        while let Ok(Some(f)) = r.read_frame() {
            if f.kind == FrameType::Control {
                let _ = f.message();
            }
        }
    }
}

#[test]
fn exit_status_codes() {
    assert_eq!(ExitStatus::Exited(42).code(), 42);
    assert_eq!(ExitStatus::Signaled(9).code(), 137);
}

#[test]
fn wire_format_is_stable() {
    let f = Frame::data(7, b"hi");
    assert_eq!(f.encode().unwrap(), [7, 0, 0, 0, 2, 7, 0, 0, 0, b'h', b'i']);
    let hello = Message::Hello {
        version: 1,
        agent_version: "x".into(),
        window: None,
    };
    assert_eq!(
        serde_json::to_string(&hello).unwrap(),
        r#"{"msg":"hello","version":1,"agent_version":"x"}"#
    );
    // The window (issue 16) is optional both ways: peers that predate it neither send it
    // nor mind it (serde skips fields it does not know).
    let hello = Message::Hello {
        version: 2,
        agent_version: "x".into(),
        window: Some(2 << 20),
    };
    let json = r#"{"msg":"hello","version":2,"agent_version":"x","window":2097152}"#;
    assert_eq!(serde_json::to_string(&hello).unwrap(), json);
    assert_eq!(serde_json::from_str::<Message>(json).unwrap(), hello);
    let later = r#"{"msg":"hello","version":2,"agent_version":"x","window":1,"new":true}"#;
    assert!(serde_json::from_str::<Message>(later).is_ok());
}

-- Seed 002 (three-node multi-master pgbench workload), script test2.sql, verbatim
-- (trailing blanks dropped) except the two delete lines: the seed writes
-- "where id=:id+1" and "where id=:id", but no variable :id is ever set. They use
-- :id1+1 and :id1 here. With the seed's lines, pgbench 15 -M prepared binds the
-- undefined :id as NULL, so both deletes silently match nothing (checked: 0
-- n_tup_del), and -M simple aborts with a syntax error at ":".
-- Run: pgbench -M prepared -n -f workloads/sql/test2.sql -c 10 -j 10 -T 120 -p <port>
-- Check: select sum(hashtext(t.id||t.info||t.mod_time)) from mm t;
-- Table: create table mm(id int primary key, info text, mod_time timestamp);
\set id1 random(1,30000)
\set id2 random(1,30000)
\set id3 random(1,30000)
\set id4 random(1,30000)
\set id5 random(1,30000)
insert into mm select 3*(random()*10000)::int+1, md5(random()::text), now() on conflict(id) do update set info=excluded.info,mod_time=clock_timestamp();
insert into mm select 3*(random()*10000)::int+1, md5(random()::text), now() on conflict(id) do update set info=excluded.info,mod_time=clock_timestamp();
insert into mm select 3*(random()*10000)::int+1, md5(random()::text), now() on conflict(id) do update set info=excluded.info,mod_time=clock_timestamp();
insert into mm select 3*(random()*10000)::int+1, md5(random()::text), now() on conflict(id) do update set info=excluded.info,mod_time=clock_timestamp();
insert into mm select 3*(random()*10000)::int+1, md5(random()::text), now() on conflict(id) do update set info=excluded.info,mod_time=clock_timestamp();
update mm set info=md5(random()::text),mod_time=clock_timestamp() where id=:id1;
update mm set info=md5(random()::text),mod_time=clock_timestamp() where id=:id2;
update mm set info=md5(random()::text),mod_time=clock_timestamp() where id=:id3;
update mm set info=md5(random()::text),mod_time=clock_timestamp() where id=:id4;
update mm set info=md5(random()::text),mod_time=clock_timestamp() where id=:id5;
delete from mm where id=:id1+1;
delete from mm where id=:id1;

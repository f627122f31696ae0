# branches.kt: peers sharing one trunk (ONE, OKDDip), a branch of a branch, searched layers
graph branches
data digits { val_split = 300 }
train { epochs = 2  batch = 32 }
node b1 : resnet20 [target]
node b2 : branch( b1 , from = layer3 )   # b1's stem, layer1, layer2 shared
node b3 : branch(b1, from="layer3.1")
node b4 : branch(b2, from=fc)
node b5 : choice(branch(b1, from=layer3), resnet20)   # a branch or a separate network
node b6 : branch(b1, from=choice(layer2, layer3))
node ens : ensemble(b1, b2, b3)
label -> b1 : through
label -> b2 : through
label -> b3 : through
label -> b4 : through
label -> b5 : through
label -> b6 : through
ens -> b1 : through kl(T=3)
ens -> b2 : through kl(T=3)
b3 -> b1 : through
b4 -> b1 : through
b5 -> b1 : through
b6 -> b1 : through
b2.layer3 -> b3.layer3 : through at(p=2)
